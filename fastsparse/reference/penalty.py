"""The oracle of the penalty: plain PyTorch for every kind and grouping of the contract.

Written for clarity, not speed: every backend (Triton, native) is tested against these functions,
and the benchmarks use them as the "eager oracle" provider. Gradients come from autograd.

Contract (docs/design.md): per group g, s1 = sum|w|, s2 = sum w^2, n = sqrt(s2); per tensor
L = sum_g n_g, F^2 = sum_g s2_g. A group with s2 = 0 contributes 0 and has gradient 0; a tensor
with F = 0 contributes 0. Statistics accumulate in fp32 (fp64 for fp64 input). The value is a
0-dim fp32 tensor (fp64 when an input is fp64, so that float64 gradcheck is meaningful).

Coupled groups (`fastsparse.CoupledGroup`) are laid out as [G, S] matrices (`coupled_matrix`)
whose rows follow the same formulas.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fastsparse.core.contract import (
    Grouping,
    accumulation_dtype,
    accumulation_dtype_of,
    as_groupings,
)
from fastsparse.core.groups import (
    CoupledGroup,
    CoupledMember,
    as_coupled_list,
    distinct_params,
)


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


def tensor_penalty(w: torch.Tensor, kind: str, grouping: str | None, alpha: float):
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
    out_dtype = accumulation_dtype_of(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    total = torch.zeros((), dtype=out_dtype, device=device)
    for w in tensors:
        if w.numel() == 0:
            continue
        for grouping in as_groupings(groups):
            total = total + tensor_penalty(w, kind, grouping, alpha).to(out_dtype)
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


def group_coefficients(stats: torch.Tensor, kind: str, alpha: float, totals=None):
    """The closed form of the gradient rule: (values [G], coefs [G, 2] = (a_g, b_g)).

    From statistics [G, 2] = (s1, s2) and, for the across-group kinds, totals = (., L, F^2) of
    the tensor: dR/dw = a_g sign(w) + b_g w for every element w of group g (the identity every
    fused kernel implements; `penalty_grad` gets the same through autograd). Groups with s2 = 0
    give zeros. For the across-group kinds, values[g] is group g's share of the tensor's value.

    >>> stats = torch.tensor([[7.0, 25.0]])  # group (3, 4): s1 = 7, s2 = 25
    >>> group_coefficients(stats, "group_lasso", 0.5)[1]  # a = 0, b = 1 / n
    tensor([[0.0000, 0.2000]])
    """
    s1, s2 = stats[:, 0], stats[:, 1]
    alive = s2 > 0
    n = torch.sqrt(torch.where(alive, s2, 1.0))
    inv_n = torch.where(alive, 1.0 / n, 0.0)
    n = torch.where(alive, n, 0.0)
    one, zero = alive.to(s1.dtype), torch.zeros_like(s1)
    if kind == "l1":
        values, a, b = s1, one, zero
    elif kind == "l2":
        values, a, b = 0.5 * s2, zero, one
    elif kind == "group_lasso":
        values, a, b = n, zero, inv_n
    elif kind == "l1l2":
        values, a, b = s1 * inv_n, inv_n, -s1 * inv_n**3
    elif kind == "hoyer_square":
        ratio = s1 * inv_n * inv_n
        values, a, b = s1 * ratio, 2 * ratio, -2 * ratio * ratio
    elif kind == "sparse_group_lasso":
        values, a, b = alpha * s1 + (1 - alpha) * n, alpha * one, (1 - alpha) * inv_n
    else:
        total_l, total_f2 = totals[1], totals[2]
        inv_f2 = torch.where(total_f2 > 0, 1.0 / torch.where(total_f2 > 0, total_f2, 1.0), 0.0)
        inv_f = torch.sqrt(inv_f2)
        a = zero
        if kind == "group_l1l2":
            values, b = n * inv_f, inv_n * inv_f - total_l * inv_f * inv_f2
        else:  # group_hoyer_square
            values = n * total_l * inv_f2
            b = 2 * total_l * inv_f2 * inv_n - 2 * total_l**2 * inv_f2**2
        b = torch.where(alive, b, 0.0)
    return values, torch.stack([a, b], dim=1)


# --- coupled groups ------------------------------------------------------------------------------


def coupled_matrix(group: CoupledGroup, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The coupled group as a [G, S] matrix (row g: every element of group g, zero padded).

    Differentiable with respect to the member parameters. Zero padding changes neither s1 nor s2,
    so every per-group formula of the contract applies to the rows unchanged.

    >>> w = torch.arange(6.0).reshape(3, 2)
    >>> m = CoupledMember("w", w, 1, torch.tensor([0, 1]), torch.tensor([0, 0]))
    >>> coupled_matrix(CoupledGroup("w", 1, (m,)))
    tensor([[0., 2., 4., 1., 3., 5.]])
    """
    dtype = dtype or accumulation_dtype_of(distinct_params([group]))
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
    return [torch.sqrt(coupled_group_stats(cg)[1]).detach() for cg in as_coupled_list(groups)]


def coupled_penalty(groups, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """Penalty of coupled groups: the sum over CoupledGroups of R applied to their groups.

    Each CoupledGroup plays the part of one tensor of the contract (the across-group kinds take
    L and F over its G groups). Differentiable with respect to the member parameters.

    >>> # penalty = coupled_penalty(fastsparse.coupled_groups(model, x), "group_lasso")
    """
    groups = as_coupled_list(groups)
    params = distinct_params(groups)
    out_dtype = accumulation_dtype_of(params)
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=out_dtype, device=device)
    for cg in groups:
        if cg.num_groups:
            value = tensor_penalty(coupled_matrix(cg), kind, "filters", alpha)
            total = total + value.to(out_dtype)
    return total


def rebind(groups: list, leaves: dict) -> list:
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
    groups = as_coupled_list(groups)
    params = distinct_params(groups)
    leaves = {id(p): p.detach().requires_grad_(True) for p in params}
    with torch.enable_grad():
        value = coupled_penalty(rebind(groups, leaves), kind, alpha)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
