"""The oracle: plain PyTorch for every penalty kind and grouping of the numerical contract.

Written for clarity, not speed: every backend (Triton, native) is tested against these functions,
and the benchmarks use them as the "eager oracle" provider. Gradients come from autograd.

Contract (DESIGN.md): per group g, s1 = sum|w|, s2 = sum w^2, n = sqrt(s2); per tensor
L = sum_g n_g, F^2 = sum_g s2_g. A group with s2 = 0 contributes 0 and has gradient 0; a tensor
with F = 0 contributes 0. Statistics accumulate in fp32 (fp64 for fp64 input). The value is a
0-dim fp32 tensor (fp64 when an input is fp64, so that float64 gradcheck is meaningful).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

KINDS = (
    "l1",
    "l2",
    "group_lasso",
    "l1l2",
    "group_l1l2",
    "hoyer_square",
    "group_hoyer_square",
    "sparse_group_lasso",
)
GROUPINGS = ("filters", "channels", "kernels", None)
ACROSS_GROUP_KINDS = ("group_l1l2", "group_hoyer_square")

Grouping = Union[str, None, Sequence[Union[str, None]]]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 input, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped_view(w: torch.Tensor, grouping: str | None) -> torch.Tensor:
    """Return w as a [groups, group_size] matrix (a copy where needed) for one grouping.

    >>> grouped_view(torch.ones(4, 3, 5, 5), "channels").shape
    torch.Size([3, 100])
    """
    shape = tuple(w.shape)
    if grouping == "filters":
        if w.dim() == 0:
            return w.reshape(1, 1)
        return w.reshape(shape[0], math.prod(shape[1:]))
    if grouping == "channels":
        return w.transpose(0, 1).reshape(shape[1], shape[0] * math.prod(shape[2:]))
    if grouping == "kernels":
        return w.reshape(shape[0] * shape[1], math.prod(shape[2:]))
    if grouping is None:
        return w.reshape(1, w.numel())
    raise ValueError(f"unknown grouping {grouping!r}")


def group_stats(w: torch.Tensor, grouping: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (s1, s2) = (sum |w|, sum w^2) in the accumulation dtype, differentiable."""
    x = grouped_view(w, grouping).to(accumulation_dtype(w.dtype))
    return x.abs().sum(dim=1), (x * x).sum(dim=1)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0, with gradients that stay finite (no NaN through where)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def _tensor_penalty(w: torch.Tensor, kind: str, grouping: str | None, alpha: float):
    s1, s2 = group_stats(w, grouping)
    nonzero = s2 > 0
    n = torch.sqrt(torch.where(nonzero, s2, torch.ones_like(s2))) * nonzero
    if kind == "l1":
        return s1.sum()
    if kind == "l2":
        return 0.5 * s2.sum()
    if kind == "group_lasso":
        return n.sum()
    if kind == "l1l2":
        return _safe_div(s1, n).sum()
    if kind == "hoyer_square":
        return _safe_div(s1 * s1, s2).sum()
    if kind == "sparse_group_lasso":
        return alpha * s1.sum() + (1.0 - alpha) * n.sum()
    total_l, total_f2 = n.sum(), s2.sum()
    if kind == "group_l1l2":
        f2_positive = total_f2 > 0
        total_f = torch.sqrt(torch.where(f2_positive, total_f2, torch.ones_like(total_f2)))
        return torch.where(f2_positive, total_l / total_f, 0.0)
    if kind == "group_hoyer_square":
        return _safe_div(total_l * total_l, total_f2)
    raise ValueError(f"unknown kind {kind!r}")


def as_groupings(groups: Grouping) -> tuple[str | None, ...]:
    """Normalize a grouping argument to a tuple of groupings."""
    if isinstance(groups, (tuple, list)):
        return tuple(groups)
    return (groups,)


def penalty(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    kind: str,
    groups: Grouping = "filters",
    alpha: float = 0.5,
) -> torch.Tensor:
    """Sum over tensors and groupings of the per-tensor penalty R(W); differentiable.

    >>> w = torch.randn(8, 3, 3, 3, requires_grad=True)
    >>> penalty(w, "l1l2").backward()
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    out_dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device if tensors else torch.device("cpu")
    total = torch.zeros((), dtype=out_dtype, device=device)
    for w in tensors:
        if w.numel() == 0:
            continue
        for grouping in as_groupings(groups):
            total = total + _tensor_penalty(w, kind, grouping, alpha).to(out_dtype)
    return total


def group_norms(
    tensors: torch.Tensor | Sequence[torch.Tensor], groups: str | None = "filters"
) -> list[torch.Tensor]:
    """Per tensor, the 1-D tensor of group l2 norms (accumulation dtype)."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    return [torch.sqrt(group_stats(w.detach(), groups)[1]) for w in tensors]


def penalty_grad(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    kind: str,
    groups: Grouping = "filters",
    alpha: float = 0.5,
) -> list[torch.Tensor]:
    """dR/dW for each tensor, in the tensor's dtype, through autograd of `penalty`."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    with torch.enable_grad():
        value = penalty(leaves, kind, groups, alpha)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


# =================================================================================================
# Proximal / threshold operators and coupled groups (issue 5).
#
# Everything below is appended to the oracle: it only adds names and never changes the functions
# above. Thresholding rule, the same for every kind and for `fastsparse.prune`: an element is dead
# when |w| <= t, a group is dead when its l2 norm n <= t (so t = 0 removes nothing but exact
# zeros, and soft and hard thresholds zero exactly the same set).
# =================================================================================================

PROX_KINDS = ("l1", "group_lasso", "l0", "group_l0", "l0_group_lasso")
ELEMENT_PROX_KINDS = ("l1", "l0")  # act element by element; the grouping only shapes the masks


@dataclass(eq=False)
class CoupledMember:
    """One parameter's share of a coupled group: slices of `param` along `dim`.

    Slice j is ``param.select(dim, index[j])``; it belongs to group ``group[j]``. A member never
    lists the same index twice, and `index` is sorted.

    Attributes:
        name: the parameter's name in the model (``model.get_parameter(name) is param``).
        param: the parameter itself (shared with the model, not a copy).
        dim: the dimension the slices are taken along (0: out rows, 1: in columns).
        index: int64 [k], slice indices along `dim`.
        group: int64 [k], the group id in [0, num_groups) of each slice.
    """

    name: str
    param: torch.Tensor
    dim: int
    index: torch.Tensor
    group: torch.Tensor

    @property
    def slice_numel(self) -> int:
        """Elements in one slice: numel(param) / param.shape[dim]."""
        return self.param.numel() // max(self.param.shape[self.dim], 1)

    def __repr__(self) -> str:
        return (
            f"CoupledMember({self.name!r}, shape={tuple(self.param.shape)}, dim={self.dim}, "
            f"slices={self.index.numel()})"
        )


@dataclass(eq=False)
class CoupledGroup:
    """G coupled groups that must be zeroed or removed together, rooted at one layer's outputs.

    Group g (for g in [0, G)) is the union over `members` of the slices mapped to g: for a conv
    root, out-channel g's filter and bias, the following BatchNorm's scale and shift, the next
    layer's in-channel slice (several Linear columns after a flatten), the depthwise filter fed by
    it, and through residual additions the same channel of every layer tied to it. Its statistics
    are s1_g = sum |w| and s2_g = sum w^2 over all those slices.

    Groups of different CoupledGroups may overlap: the element W[o, c] of a conv belongs to group
    o of that conv and to group c of the layer that produces its input channel c.

    Attributes:
        root: name of the root module: the first conv or linear layer (in module order) whose
            out-channels are in the group; group g is its out-channel g.
        num_groups: G, the root's number of output channels.
        members: the parameter slices, in the model's parameter order.
    """

    root: str
    num_groups: int
    members: tuple

    def params(self) -> list:
        """The distinct parameters of the members, in order of first appearance."""
        return _distinct_params([self])

    def group_sizes(self) -> torch.Tensor:
        """int64 [G]: number of elements in each group."""
        sizes = torch.zeros(self.num_groups, dtype=torch.int64)
        for m in self.members:
            sizes.index_add_(0, m.group, torch.full_like(m.group, m.slice_numel))
        return sizes

    def __repr__(self) -> str:
        names = ", ".join(f"{m.name}[dim {m.dim}]" for m in self.members)
        return f"CoupledGroup(root={self.root!r}, num_groups={self.num_groups}, members=[{names}])"


def is_coupled(groups) -> bool:
    """True for a CoupledGroup or a list/tuple of them (an empty list counts: no groups)."""
    if isinstance(groups, CoupledGroup):
        return True
    return isinstance(groups, (list, tuple)) and all(isinstance(g, CoupledGroup) for g in groups)


def _as_coupled_list(groups) -> list:
    return [groups] if isinstance(groups, CoupledGroup) else list(groups)


def _distinct_params(groups) -> list:
    seen, params = set(), []
    for cg in groups:
        for m in cg.members:
            if id(m.param) not in seen:
                seen.add(id(m.param))
                params.append(m.param)
    return params


def _coupled_accumulation_dtype(groups) -> torch.dtype:
    params = _distinct_params(groups)
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def coupled_matrix(group: CoupledGroup, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The coupled group as a [G, S] matrix (row g: every element of group g, zero padded).

    Differentiable with respect to the member parameters. Zero padding changes neither s1 nor s2,
    so every per-group formula of the contract applies to the rows unchanged.

    >>> w = torch.arange(6.0).reshape(3, 2)
    >>> m = CoupledMember("w", w, 1, torch.tensor([0, 1]), torch.tensor([0, 0]))
    >>> coupled_matrix(CoupledGroup("w", 1, (m,)))
    tensor([[0., 2., 4., 1., 3., 5.]])
    """
    dtype = dtype or _coupled_accumulation_dtype([group])
    num_groups = group.num_groups
    blocks = []
    for m in group.members:
        device = m.param.device
        index, gid = m.index.to(device), m.group.to(device)
        k = index.numel()
        slices = m.param.movedim(m.dim, 0).index_select(0, index).reshape(k, -1).to(dtype)
        counts = torch.bincount(gid, minlength=num_groups)
        per_group = int(counts.max()) if k else 0
        order = torch.argsort(gid, stable=True)
        sorted_gid = gid[order]
        first = torch.cumsum(counts, 0) - counts  # first position of each group in sorted order
        position = torch.arange(k, device=device) - first[sorted_gid]
        block = slices.new_zeros(num_groups, per_group, slices.shape[1])
        block = block.index_put((sorted_gid, position), slices[order])
        blocks.append(block.reshape(num_groups, -1))
    if not blocks:
        return torch.zeros(num_groups, 0, dtype=dtype)
    return torch.cat(blocks, dim=1)


def coupled_group_stats(group: CoupledGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (s1, s2) [G] of a coupled group, summed over all member slices; differentiable."""
    return group_stats(coupled_matrix(group), "filters")


def coupled_group_norms(groups) -> list[torch.Tensor]:
    """Per CoupledGroup, the [G] tensor of coupled group l2 norms (accumulation dtype)."""
    return [torch.sqrt(coupled_group_stats(cg)[1]).detach() for cg in _as_coupled_list(groups)]


def coupled_penalty(groups, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """Penalty of coupled groups: the sum over CoupledGroups of R applied to their groups.

    Each CoupledGroup plays the part of one tensor of the contract (the across-group kinds take
    L and F over its G groups). Differentiable with respect to the member parameters.

    >>> # penalty = coupled_penalty(fastsparse.coupled_groups(model, x), "group_lasso")
    """
    groups = _as_coupled_list(groups)
    params = _distinct_params(groups)
    out_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=out_dtype, device=device)
    for cg in groups:
        if cg.num_groups:
            value = _tensor_penalty(coupled_matrix(cg), kind, "filters", alpha)
            total = total + value.to(out_dtype)
    return total


def _rebind(groups: list, leaves: dict) -> list:
    """The same coupled groups with every member parameter replaced by leaves[id(param)]."""
    return [
        CoupledGroup(
            cg.root,
            cg.num_groups,
            tuple(
                CoupledMember(m.name, leaves[id(m.param)], m.dim, m.index, m.group)
                for m in cg.members
            ),
        )
        for cg in groups
    ]


def coupled_penalty_grad(groups, kind: str, alpha: float = 0.5) -> list[torch.Tensor]:
    """dR/dW of `coupled_penalty` for each parameter of `coupled_params(groups)`, same dtype."""
    groups = _as_coupled_list(groups)
    params = _distinct_params(groups)
    leaves = {id(p): p.detach().requires_grad_(True) for p in params}
    with torch.enable_grad():
        value = coupled_penalty(_rebind(groups, leaves), kind, alpha)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def coupled_params(groups) -> list[torch.Tensor]:
    """The distinct parameters of coupled groups, in order of first appearance."""
    return _distinct_params(_as_coupled_list(groups))


def prox_thresholds(kind: str, threshold) -> tuple[float, float]:
    """(element threshold, group threshold) of a prox kind.

    ``l0_group_lasso`` takes a float (used for both stages) or a pair (t_l0, t_group); the other
    kinds take a float.
    """
    if isinstance(threshold, (tuple, list)):
        if kind != "l0_group_lasso" or len(threshold) != 2:
            raise ValueError(
                f"a pair of thresholds is only accepted by 'l0_group_lasso', got {threshold!r} "
                f"for {kind!r}"
            )
        return float(threshold[0]), float(threshold[1])
    return float(threshold), float(threshold)


def _soft_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0)


def _hard_threshold(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.where(x.abs() > t, x, torch.zeros_like(x))


def _group_factor(s2: torch.Tensor, kind: str, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group multiplier and kept mask from s2: max(0, 1 - t/n) (group_lasso) or n > t."""
    n = torch.sqrt(s2)
    kept = n > t
    if kind == "group_l0":
        return kept.to(s2.dtype), kept
    safe_n = torch.where(kept, n, torch.ones_like(n))
    return torch.where(kept, 1.0 - t / safe_n, torch.zeros_like(n)), kept


def _prox_rows(x: torch.Tensor, kind: str, t_elem: float, t_group: float):
    """Prox of a [G, S] matrix (accumulation dtype): (new matrix, kept [G] bool)."""
    if kind == "l1":
        y = _soft_threshold(x, t_elem)
        return y, (y != 0).any(dim=1)
    if kind == "l0":
        y = _hard_threshold(x, t_elem)
        return y, (y != 0).any(dim=1)
    if kind == "l0_group_lasso":
        x = _hard_threshold(x, t_elem)
    factor_kind = "group_l0" if kind == "group_l0" else "group_lasso"
    factor, kept = _group_factor((x * x).sum(dim=1), factor_kind, t_group)
    return x * factor[:, None], kept


def _ungroup(x: torch.Tensor, shape: torch.Size, grouping: str | None) -> torch.Tensor:
    """Inverse of `grouped_view`: a [groups, group_size] matrix back to `shape`."""
    if grouping == "channels":
        return x.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
    return x.reshape(shape)


def prox_(
    tensors: torch.Tensor | Sequence[torch.Tensor] | None,
    kind: str,
    threshold,
    groups="filters",
) -> list[torch.Tensor]:
    """Proximal / threshold step, in place (under no_grad); returns masks of kept groups.

    Kinds (t = threshold; n = group l2 norm):
      - ``"l1"``: soft threshold sign(w)·max(|w| − t, 0).
      - ``"l0"``: hard threshold, w where |w| > t else 0 (|w| == t is zeroed).
      - ``"group_lasso"``: w·max(0, 1 − t/n); groups with n <= t (zero groups too) become 0.
      - ``"group_l0"``: groups with n <= t become 0, the others are unchanged.
      - ``"l0_group_lasso"``: hard threshold elements, then group shrink of what is left (Bui et
        al.); `threshold` may be a pair (t_l0, t_group).

    New values are computed in fp32 (fp64 for fp64) and rounded once to the tensor's dtype.

    Args:
        tensors: a tensor or a sequence of tensors; ignored (may be None) with coupled groups.
        groups: a grouping of the contract ("filters", "channels", "kernels", None), or a
            CoupledGroup / list of them. Tuples of groupings are not accepted.

    Returns:
        One bool tensor per tensor ([groups] of its grouping), or per CoupledGroup ([G]): True
        where the group survived (group kinds: n > t before the group stage; element kinds: the
        group still has a nonzero element).

    Coupled groups are processed simultaneously: all norms come from the input weights, an element
    is multiplied by the factors of every group that contains it (group_lasso) or zeroed when any
    of its groups is dead (group_l0), and the element kinds apply once to every element covered by
    at least one group. Parameters outside the groups are untouched.

    >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> prox_(w, "group_lasso", 1.0)
    [tensor([ True, False])]
    >>> w
    tensor([[2.4000, 3.2000],
            [0.0000, 0.0000]])
    """
    if kind not in PROX_KINDS:
        raise ValueError(f"unknown prox kind {kind!r}; valid kinds: {', '.join(PROX_KINDS)}")
    t_elem, t_group = prox_thresholds(kind, threshold)
    if is_coupled(groups):
        return _coupled_prox_(_as_coupled_list(groups), kind, t_elem, t_group)
    if isinstance(groups, (tuple, list)):
        raise ValueError("prox_ takes one grouping, not a tuple of groupings")
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    masks = []
    with torch.no_grad():
        for w in tensors:
            x = grouped_view(w, groups).to(accumulation_dtype(w.dtype))
            y, kept = _prox_rows(x, kind, t_elem, t_group)
            w.copy_(_ungroup(y, w.shape, groups))
            masks.append(kept)
    return masks


def _coupled_prox_(groups: list, kind: str, t_elem: float, t_group: float) -> list[torch.Tensor]:
    """Simultaneous prox over coupled groups (see `prox_`)."""
    params = _distinct_params(groups)
    acc = _coupled_accumulation_dtype(groups)
    with torch.no_grad():
        if kind in ("l1", "l0", "l0_group_lasso"):
            covered = {id(p): torch.zeros_like(p, dtype=torch.bool) for p in params}
            for cg in groups:
                for m in cg.members:
                    covered[id(m.param)].index_fill_(m.dim, m.index.to(m.param.device), True)
            rule = _soft_threshold if kind == "l1" else _hard_threshold
            for p in params:
                x = p.to(acc)
                p.copy_(torch.where(covered[id(p)], rule(x, t_elem), x))
        if kind in ELEMENT_PROX_KINDS:
            return [coupled_group_stats(cg)[0] > 0 for cg in groups]

        factor_kind = "group_l0" if kind == "group_l0" else "group_lasso"
        factors, masks = [], []
        for cg in groups:  # every norm first, from the same weights
            factor, kept = _group_factor(coupled_group_stats(cg)[1], factor_kind, t_group)
            factors.append(factor)
            masks.append(kept)
        scale = {id(p): torch.ones(p.shape, dtype=acc, device=p.device) for p in params}
        for cg, factor in zip(groups, factors):
            for m in cg.members:
                s = scale[id(m.param)]
                index = m.index.to(s.device)
                shape = [1] * s.dim()
                shape[m.dim] = index.numel()
                f = factor.to(s.device)[m.group.to(s.device)].reshape(shape)
                s.index_copy_(m.dim, index, s.index_select(m.dim, index) * f)
        for p in params:
            p.copy_(p.to(acc) * scale[id(p)])
    return masks


# =================================================================================================
# Feature flow regularization and selective weight decay (issue 8).
#
# Appended to the oracle: only new names, nothing above changes. OICSR is `coupled_penalty` on the
# groups of `fastsparse.oicsr.oicsr_groups`, and network slimming is `penalty(bn_scales, "l1")`:
# both are served by the functions above.
# =================================================================================================

FLOW_REDUCTIONS = ("mean", "sum")
RELEVANCE_KINDS = ("taylor", "magnitude", "gradient")


def feature_flow(
    features: Sequence[torch.Tensor],
    gradient_weight: float = 1.0,
    curvature_weight: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Feature flow penalty (Wu et al., 2021) of L same-shape maps F_0 .. F_{L-1}; differentiable.

        R = a * sum_{l=0}^{L-2} ||F_{l+1} - F_l||^2
          + b * sum_{l=1}^{L-2} ||F_{l+1} - 2 F_l + F_{l-1}||^2

    with a = gradient_weight / M, b = curvature_weight / M, M = numel(F_0) for reduction "mean"
    (a mean over the elements of one map, so the value does not grow with batch or resolution)
    and M = 1 for "sum". Fewer than 2 maps give 0; the curvature term needs 3. Computed in fp32
    (fp64 for fp64 maps); the value is 0-dim fp32 (fp64).

    >>> f = [torch.zeros(2, 3), torch.ones(2, 3), 3 * torch.ones(2, 3)]
    >>> feature_flow(f, 1.0, 1.0, "mean")  # (1 + 4) + 1
    tensor(6.)
    """
    features = list(features)
    dtype = torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32
    device = features[0].device if features else torch.device("cpu")
    total = torch.zeros((), dtype=dtype, device=device)
    if len(features) < 2:  # 0, still connected to the maps so that backward() works
        return total + sum(0.0 * f.sum().to(dtype) for f in features)
    x = [f.to(dtype) for f in features]
    m = x[0].numel() if reduction == "mean" else 1
    for k in range(len(x) - 1):
        total = total + (gradient_weight / m) * (x[k + 1] - x[k]).square().sum()
    for k in range(1, len(x) - 1):
        total = total + (curvature_weight / m) * (x[k + 1] - 2 * x[k] + x[k - 1]).square().sum()
    return total


def feature_flow_grad(
    features: Sequence[torch.Tensor],
    gradient_weight: float = 1.0,
    curvature_weight: float = 1.0,
    reduction: str = "mean",
) -> list[torch.Tensor]:
    """dR/dF_l of `feature_flow` for every map, in the maps' dtype, through autograd."""
    leaves = [f.detach().requires_grad_(True) for f in features]
    with torch.enable_grad():
        value = feature_flow(leaves, gradient_weight, curvature_weight, reduction)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [torch.zeros_like(f) if g is None else g.to(f.dtype) for f, g in zip(leaves, grads)]


def relevance(w: torch.Tensor, g: torch.Tensor, kind: str = "taylor") -> torch.Tensor:
    """Per-weight relevance in the accumulation dtype (Bonetta et al., 2022).

    ``"taylor"`` (default): |dL/dw * w|, the first-order Taylor estimate of how much the loss
    changes when w is set to 0 (|L(w) - L(0)| ~ |g w|). ``"magnitude"``: |w|. ``"gradient"``: |g|.

    >>> relevance(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0]))
    tensor([1., 3.])
    """
    acc = accumulation_dtype(torch.promote_types(w.dtype, g.dtype))
    w, g = w.to(acc), g.to(acc)
    if kind == "taylor":
        return (g * w).abs()
    if kind == "magnitude":
        return w.abs()
    if kind == "gradient":
        return g.abs()
    raise ValueError(f"unknown relevance {kind!r}; valid: {', '.join(RELEVANCE_KINDS)}")


def quantile_threshold(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """The threshold tau with exactly floor(quantile * n) of `scores` <= tau (ties aside).

    tau is the k-th smallest score, k = floor(quantile * n); for k = 0 it is -1 (scores are
    >= 0, so nothing is selected). 0-dim, the scores' dtype.

    >>> quantile_threshold(torch.tensor([4.0, 1.0, 3.0, 2.0]), 0.5)
    tensor(2.)
    """
    scores = scores.flatten()
    k = int(math.floor(quantile * scores.numel() + 1e-9))
    if k == 0:
        return torch.full((), -1.0, dtype=scores.dtype, device=scores.device)
    return torch.kthvalue(scores, k).values


def relevance_thresholds(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    quantile: float,
    relevance_kind: str = "taylor",
    scope: str = "global",
) -> torch.Tensor:
    """Per-tensor thresholds [T] such that a `quantile` share of the relevances is <= them.

    The share is of the nonzero weights: zero weights (pruned ones) are left out of the
    population (they are always "irrelevant", and decaying them changes nothing).
    scope ``"global"``: one quantile over all tensors' weights (every entry is the same);
    ``"tensor"``: one quantile per tensor.
    """
    scores = [
        relevance(w, g, relevance_kind).flatten()[w.flatten() != 0] for w, g in zip(weights, grads)
    ]
    if scope == "global":
        tau = quantile_threshold(torch.cat(scores), quantile)
        return tau.expand(len(scores)).clone()
    return torch.stack([quantile_threshold(s, quantile) for s in scores])


def selective_decay_grad(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    strength: float,
    relevance_kind: str = "taylor",
    keep_loss_grad: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """New gradients of selective weight decay (Bonetta et al., 2022) and the irrelevant masks.

    Per tensor i with threshold tau_i = thresholds[i]: a weight is irrelevant when its
    relevance <= tau_i; its gradient becomes g + strength * w (keep_loss_grad) or strength * w
    (decay only); relevant weights keep g (the plain update). Computed in fp32 (fp64), returned
    in the gradients' dtypes. Nothing is modified.

    >>> w, g = torch.tensor([1.0, 2.0]), torch.tensor([0.1, 1.0])
    >>> selective_decay_grad([w], [g], torch.tensor([0.5]), 0.1)[0]
    [tensor([0.2000, 1.0000])]
    """
    new_grads, masks = [], []
    for i, (w, g) in enumerate(zip(weights, grads)):
        r = relevance(w, g, relevance_kind)
        irrelevant = r <= thresholds[i].to(r.dtype)
        wa, ga = w.to(r.dtype), g.to(r.dtype)
        decay = strength * wa
        new = torch.where(irrelevant, ga + decay if keep_loss_grad else decay, ga)
        new_grads.append(new.to(g.dtype))
        masks.append(irrelevant)
    return new_grads, masks


def selective_decay_penalty(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], strength: float
) -> torch.Tensor:
    """strength/2 * sum of w^2 over the irrelevant weights (masks held fixed); differentiable.

    Its gradient, strength * w on the masked weights, is the decay `selective_decay_grad` adds.
    """
    weights = list(weights)
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32
    total = torch.zeros((), dtype=dtype, device=weights[0].device if weights else "cpu")
    for w, m in zip(weights, masks):
        total = total + 0.5 * strength * (w.to(dtype).square() * m).sum()
    return total
