"""The oracle of the proximal / threshold steps, on plain groupings and on coupled groups.

Thresholding rule, the same for every kind and for `fastsparse.prune`: an element is dead when
|w| <= t, a group is dead when its l2 norm n <= t (so t = 0 removes nothing but exact zeros, and
soft and hard thresholds zero exactly the same set).
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastsparse.core.contract import (
    ELEMENT_PROX_KINDS,
    PROX_KINDS,
    accumulation_dtype,
    accumulation_dtype_of,
)
from fastsparse.core.groups import as_coupled_list, distinct_params, is_coupled
from fastsparse.reference.penalty import (
    coupled_group_stats,
    grouped_view,
)


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


def ungroup(x: torch.Tensor, shape: torch.Size, grouping: str | None) -> torch.Tensor:
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
        return _coupled_prox_(as_coupled_list(groups), kind, t_elem, t_group)
    if isinstance(groups, (tuple, list)):
        raise ValueError("prox_ takes one grouping, not a tuple of groupings")
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    masks = []
    with torch.no_grad():
        for w in tensors:
            x = grouped_view(w, groups).to(accumulation_dtype(w.dtype))
            y, kept = _prox_rows(x, kind, t_elem, t_group)
            w.copy_(ungroup(y, w.shape, groups))
            masks.append(kept)
    return masks


def _coupled_prox_(groups: list, kind: str, t_elem: float, t_group: float) -> list[torch.Tensor]:
    """Simultaneous prox over coupled groups (see `prox_`)."""
    params = distinct_params(groups)
    acc = accumulation_dtype_of(params)
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
        _coupled_scale_(groups, factors)
    return masks


def scale_groups_(tensors, factors, groups="filters") -> None:
    """Multiply every group by its factor, in place: w_g <- f_g * w_g.

    Computed in the accumulation dtype and rounded once. `factors` holds one [groups] tensor per
    tensor (plain groupings) or one [G] tensor per CoupledGroup (`tensors` ignored); an element
    in several coupled groups is multiplied by each of their factors. Masks are factors too:
    ``scale_groups_(w, [kept])`` zeroes the groups where `kept` is False.

    >>> w = torch.ones(3, 2)
    >>> scale_groups_(w, [torch.tensor([1.0, 0.0, 0.5])])
    >>> w
    tensor([[1.0000, 1.0000],
            [0.0000, 0.0000],
            [0.5000, 0.5000]])
    """
    if is_coupled(groups):
        with torch.no_grad():
            _coupled_scale_(as_coupled_list(groups), list(factors))
        return
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    with torch.no_grad():
        for w, factor in zip(tensors, factors):
            x = grouped_view(w, groups).to(accumulation_dtype(w.dtype))
            w.copy_(ungroup(x * factor.to(x.device, x.dtype)[:, None], w.shape, groups))


def _coupled_scale_(groups: list, factors: list) -> None:
    """Each coupled group's members times its factors, all from the same weights."""
    params = distinct_params(groups)
    acc = accumulation_dtype_of(params)
    scale = {id(p): torch.ones(p.shape, dtype=acc, device=p.device) for p in params}
    for cg, factor in zip(groups, factors):
        for m in cg.members:
            s = scale[id(m.param)]
            index = m.index.to(s.device)
            shape = [1] * s.dim()
            shape[m.dim] = index.numel()
            f = factor.to(s.device, acc)[m.group.to(s.device)].reshape(shape)
            s.index_copy_(m.dim, index, s.index_select(m.dim, index) * f)
    for p in params:
        p.copy_(p.to(acc) * scale[id(p)])


def sgd_prox_(params, bufs, options: dict, kind: str, threshold, groups="filters") -> list:
    """torch.optim.SGD's step, then `prox_`, in plain PyTorch: the oracle of the fused pass.

    `options`: lr, momentum, dampening, weight_decay, nesterov; `bufs` the momentum buffers
    (None at the first step: they are returned, filled). Returns (masks, bufs).
    """
    lr, mu = options["lr"], options["momentum"]
    new_bufs = []
    with torch.no_grad():
        for i, p in enumerate(params):
            d = p.grad + options["weight_decay"] * p
            if mu != 0:
                if bufs is None:
                    buf = d.clone()
                else:
                    buf = bufs[i].mul_(mu).add_(d, alpha=1 - options["dampening"])
                new_bufs.append(buf)
                d = d + mu * buf if options["nesterov"] else buf
            p.add_(d, alpha=-lr)
    return prox_([p.detach() for p in params], kind, threshold, groups), new_bufs


def adam_prox_(params, exp_avgs, exp_avg_sqs, options: dict, step: int, kind, threshold, groups):
    """torch.optim.Adam / AdamW's step (options: lr, betas, eps, weight_decay, decoupled; `step`
    the step being taken, from 1), then `prox_`, in plain PyTorch; the moments are updated in
    place. Returns the masks."""
    lr, (beta1, beta2), eps = options["lr"], options["betas"], options["eps"]
    wd = options["weight_decay"]
    with torch.no_grad():
        for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
            g = p.grad
            if options["decoupled"]:
                p.mul_(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))
    return prox_([p.detach() for p in params], kind, threshold, groups)
