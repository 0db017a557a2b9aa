"""torch.library registration of every fused op, in one place: schemas, fake kernels, autograd.

The ops are opaque to torch.compile (they launch pointer-table kernels), declare exactly what they
mutate, and have fake kernels so that `torch.compile(fullgraph=True)` traces through them. Their
implementations live in the backend modules (fastsparse.kernels for "triton", fastsparse.native
for "native": CPU and CUDA C++), imported on first call so that `import fastsparse` never
imports triton or initializes CUDA.

Groupings travel as one string ("filters,channels", "none" for None): see layout.encode_groupings.
"""

from __future__ import annotations

import importlib
from typing import List, Tuple

import torch
from torch import Tensor

from fastsparse.layout import decode_groupings, group_count

_BACKEND_MODULES = {"triton": "fastsparse.kernels.penalty", "native": "fastsparse.native"}


def _backend(name: str):
    if name not in _BACKEND_MODULES:
        raise ValueError(f"no fused implementation for backend {name!r}")
    return importlib.import_module(_BACKEND_MODULES[name])


def _acc_dtype(weights: List[Tensor]) -> torch.dtype:
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def _total_groups(weights: List[Tensor], groups: str) -> int:
    return sum(group_count(w.shape, g) for w in weights for g in decode_groupings(groups))


# --- penalty value (differentiable) ----------------------------------------------------------


@torch.library.custom_op("fastsparse::penalty", mutates_args=())
def penalty_op(
    weights: List[Tensor], kind: str, groups: str, alpha: float, backend: str
) -> Tuple[Tensor, Tensor]:
    """(value, per-group gradient coefficients [groups, 2]) of the summed penalty."""
    value, coefs = _backend(backend).penalty_forward(weights, kind, decode_groupings(groups), alpha)
    return value.to(_acc_dtype(weights)), coefs


@penalty_op.register_fake
def _(weights, kind, groups, alpha, backend):
    acc = _acc_dtype(weights)
    value = weights[0].new_empty((), dtype=acc)
    return value, weights[0].new_empty((_total_groups(weights, groups), 2), dtype=acc)


@torch.library.custom_op("fastsparse::penalty_backward", mutates_args=())
def penalty_backward_op(
    weights: List[Tensor],
    coefs: Tensor,
    grad_value: Tensor,
    kind: str,
    groups: str,
    alpha: float,
    backend: str,
) -> List[Tensor]:
    """grad_value * dR/dW for each weight, in the weight's dtype and layout."""
    return _backend(backend).penalty_backward(
        weights, coefs, grad_value, kind, decode_groupings(groups), alpha
    )


@penalty_backward_op.register_fake
def _(weights, coefs, grad_value, kind, groups, alpha, backend):
    return [
        torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device) for w in weights
    ]


def _penalty_setup_context(ctx, inputs, output):
    weights, kind, groups, alpha, backend = inputs
    _, coefs = output
    ctx.mark_non_differentiable(coefs)
    ctx.save_for_backward(*weights, coefs)
    ctx.options = (kind, groups, alpha, backend)


def _penalty_backward(ctx, grad_value, _grad_coefs):
    *weights, coefs = ctx.saved_tensors
    kind, groups, alpha, backend = ctx.options
    grads = penalty_backward_op(weights, coefs, grad_value, kind, groups, alpha, backend)
    return grads, None, None, None, None


penalty_op.register_autograd(_penalty_backward, setup_context=_penalty_setup_context)


# --- in-place gradient -------------------------------------------------------------------------


@torch.library.custom_op("fastsparse::add_penalty_grad_", mutates_args=("grads",))
def add_penalty_grad_op(
    grads: List[Tensor],
    weights: List[Tensor],
    kind: str,
    groups: str,
    alpha: float,
    strength: float,
    backend: str,
) -> Tensor:
    """grads[i] += strength * dR/dW_i; returns the penalty value R (0-dim)."""
    value = _backend(backend).add_penalty_grad(
        grads, weights, kind, decode_groupings(groups), alpha, strength
    )
    return value.to(_acc_dtype(weights))


@add_penalty_grad_op.register_fake
def _(grads, weights, kind, groups, alpha, strength, backend):
    return weights[0].new_empty((), dtype=_acc_dtype(weights))


# --- group norms -------------------------------------------------------------------------------


@torch.library.custom_op("fastsparse::group_norms", mutates_args=())
def group_norms_op(weights: List[Tensor], grouping: str, backend: str) -> Tensor:
    """The group l2 norms of all weights, concatenated (split them by group counts)."""
    (decoded,) = decode_groupings(grouping)
    return _backend(backend).group_norms(weights, decoded)


@group_norms_op.register_fake
def _(weights, grouping, backend):
    return weights[0].new_empty((_total_groups(weights, grouping),), dtype=_acc_dtype(weights))
