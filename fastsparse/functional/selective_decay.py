"""The selective weight decay op's public functions (Bonetta, Ribero and Cancelliere, 2022).

After ``loss.backward()``, every weight whose relevance r (default |g w|) is <= tau gets

    g <- g + lambda * w          (keep_loss_grad=True, default)
    g <- lambda * w              (keep_loss_grad=False)

and the others keep g. The oracle is fastsparse/reference/selective_decay.py, the kernel
fastsparse.backends.triton.selective_decay (one in-place pass over every (w, g), no host sync); the
regularizer object and the pruning schedule are the method (fastsparse/methods/selective_decay.py).
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Union

import torch
from torch import nn

from fastsparse import ops, reference
from fastsparse.backends import resolve_backend
from fastsparse.core.checks import (
    allocate_missing_grads,
    as_tensor_list,
    check_distinct,
    check_grads,
    check_real,
    check_tensors,
)
from fastsparse.core.contract import RELEVANCE_KINDS, accumulation_dtype_of
from fastsparse.core.groups import default_parameters
from fastsparse.core.layout import is_dense

__all__ = ["relevance_thresholds", "selective_decay_"]

SCOPES = ("global", "tensor")

Params = Union[nn.Module, Iterable[torch.Tensor]]


def selected_params(model_or_params: Params) -> List[torch.Tensor]:
    """The tensors selective decay acts on, validated: a module's Conv and Linear weights, or
    the given tensors (distinct, dense, floating, on one device)."""
    if isinstance(model_or_params, nn.Module):
        params = default_parameters(model_or_params, include_output=True)  # every weight
    else:
        params = as_tensor_list(model_or_params, name="params")
    if not params:
        raise ValueError("no parameters given")
    check_tensors(params, name="params")
    check_distinct(params, name="params")
    return params


def check_options(relevance: str, scope: str) -> None:
    if relevance not in RELEVANCE_KINDS:
        raise ValueError(f"unknown relevance {relevance!r}; valid: {', '.join(RELEVANCE_KINDS)}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")


def relevance_thresholds(
    params: Params, quantile: float, *, relevance: str = "taylor", scope: str = "global"
) -> torch.Tensor:
    """Per-tensor thresholds [T] (fp32, fp64 for fp64) at the `quantile` of the relevances.

    Reads ``p.grad`` (None counts as zeros). The population is the nonzero weights; exactly
    floor(quantile * n) of them have relevance <= the threshold (ties aside); with none, the
    threshold is -1 (nothing selected). No host sync: the count stays on the device and the
    k-th smallest comes from a sort of the relevances (zero weights last).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 4.0]))
        >>> w.grad = torch.tensor([1.0, 1.0, 0.1, 1.0])
        >>> relevance_thresholds([w], 0.5)  # relevances 1, 2, 0.3, 4
        tensor([1.])
    """
    params = selected_params(params)
    check_grads(params, name="params")
    check_options(relevance, scope)
    quantile = check_real("quantile", quantile, 0.0, 1.0)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    with torch.no_grad():
        # The oracle drops zero weights by boolean indexing and picks with kthvalue(k): both
        # need the count on the host, a sync per step on a GPU. Here zero weights sort last
        # (+inf) and the k-th smallest is gathered with k kept on the device: the same value.
        scores, counts = [], []
        for p, g in zip(params, grads):
            w = p.detach().flatten()
            alive = w != 0
            score = reference.relevance(w, g.flatten(), relevance)
            scores.append(score.masked_fill(~alive, math.inf))
            counts.append(alive.sum())
        if scope == "global":
            tau = _kth_smallest(torch.cat(scores), torch.stack(counts).sum(), quantile)
            return tau.expand(len(scores)).clone()
        return torch.stack([_kth_smallest(s, n, quantile) for s, n in zip(scores, counts)])


def _kth_smallest(scores: torch.Tensor, count: torch.Tensor, quantile: float) -> torch.Tensor:
    """The k-th smallest score, k = floor(quantile * count) as reference.quantile_threshold
    computes it, k and the result on the device; -1 for k = 0 (0-dim, the scores' dtype)."""
    none = torch.full((), -1.0, dtype=scores.dtype, device=scores.device)
    if scores.numel() == 0:
        return none
    k = torch.floor(count.to(torch.float64) * quantile + 1e-9).to(torch.int64)
    picked = torch.sort(scores).values.gather(0, (k - 1).clamp(min=0).reshape(1)).reshape(())
    return torch.where(k > 0, picked, none)


def selective_decay_(
    params: Params,
    strength: float,
    *,
    quantile: Optional[float] = None,
    threshold: Union[float, torch.Tensor, None] = None,
    relevance: str = "taylor",
    scope: str = "global",
    keep_loss_grad: bool = True,
    backend: Optional[str] = "auto",
) -> torch.Tensor:
    """Selective weight decay, in place on ``p.grad``: call after backward, before the step.

    Args:
        params: an ``nn.Module`` (its Conv and Linear weights) or tensors with ``.grad``
            (None is taken as zeros and allocated).
        strength: lambda >= 0, the decay coefficient of the irrelevant weights.
        quantile: q in [0, 1]: the threshold is the q-quantile of the relevances (of the
            nonzero weights), see `scope`. Give exactly one of `quantile` and `threshold`.
        threshold: an absolute relevance threshold: a number, or a tensor of one threshold per
            param ([T], e.g. from :func:`relevance_thresholds`).
        relevance: "taylor" (|g * w|, default), "magnitude" (|w|) or "gradient" (|g|).
        scope: "global" (one quantile over all params) or "tensor" (one per param).
        keep_loss_grad: irrelevant weights get g + lambda*w (True) or lambda*w (False).
        backend: "auto", "triton" or "torch" (the oracle).

    Returns:
        The number of weights at or below their threshold, zero weights included (0-dim int64
        tensor, no host sync).

    Example:
        >>> model = torch.nn.Linear(8, 4)
        >>> model(torch.randn(3, 8)).sum().backward()
        >>> n = selective_decay_(model, 1e-2, quantile=0.5, backend="torch")
        >>> int(n)
        16
    """
    params = selected_params(params)
    check_grads(params, name="params")
    check_options(relevance, scope)
    strength = check_real("strength", strength)
    if (quantile is None) == (threshold is None):
        raise ValueError("give exactly one of quantile and threshold")
    device = params[0].device
    if threshold is None:
        thresholds = relevance_thresholds(params, quantile, relevance=relevance, scope=scope)
    elif isinstance(threshold, torch.Tensor):
        thresholds = threshold.detach().reshape(-1).to(device)
        if thresholds.numel() == 1:
            thresholds = thresholds.expand(len(params))
        if thresholds.numel() != len(params):
            raise ValueError(f"threshold has {thresholds.numel()} entries for {len(params)} params")
    else:
        value = check_real("threshold", threshold, -math.inf)
        thresholds = torch.full((len(params),), value, dtype=torch.float64, device=device)
    name = resolve_backend(backend, device, op="selective_decay")
    allocate_missing_grads(params)
    with torch.no_grad():
        if name == "torch":
            weights = [p.detach() for p in params]
            new, masks = reference.selective_decay_grad(
                weights, [p.grad for p in params], thresholds, strength, relevance, keep_loss_grad
            )
            for p, g in zip(params, new):
                p.grad.copy_(g)
            return sum(m.sum() for m in masks).to(torch.int64)
        return _fused(params, thresholds, strength, relevance, keep_loss_grad, name)


def _fused(params, thresholds, strength, relevance, keep_loss_grad, backend) -> torch.Tensor:
    weights, grads, staging = [], [], []
    for p in params:
        w, g = p.detach(), p.grad
        if not (is_dense(w) and g.stride() == w.stride()):
            # The kernel walks w and g with one flat index: go through contiguous buffers.
            w, staged = w.contiguous(), g.contiguous()
            if staged is not g:
                staging.append((g, staged))
            g = staged
        weights.append(w)
        grads.append(g)
    acc = accumulation_dtype_of(weights)
    count = ops.call(
        ops.selective_decay_op,
        grads,
        weights,
        thresholds.to(acc),
        list(range(len(weights))),
        strength,
        relevance,
        keep_loss_grad,
        backend,
    )
    for target, staged in staging:
        target.copy_(staged)
    return count
