"""The oracle of selective weight decay (Bonetta et al., 2022): relevances, thresholds, updates."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fastsparse.core.contract import RELEVANCE_KINDS, accumulation_dtype, accumulation_dtype_of


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
    dtype = accumulation_dtype_of(weights)
    total = torch.zeros((), dtype=dtype, device=weights[0].device if weights else "cpu")
    for w, m in zip(weights, masks):
        total = total + 0.5 * strength * (w.to(dtype).square() * m).sum()
    return total
