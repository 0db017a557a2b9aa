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
    out_dtype = (
        torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    )
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
