"""The feature flow op's public functions (Wu, Lan, Zhang and Xiang, 2021, arXiv 2106.02914).

For L same-shape maps F_0 .. F_{L-1}:

    R = a * sum_{l=0}^{L-2} ||F_{l+1} - F_l||^2
      + b * sum_{l=1}^{L-2} ||F_{l+1} - 2 F_l + F_{l-1}||^2

with a = gradient_weight / M and b = curvature_weight / M, M = numel(F_l) for ``reduction="mean"``
or 1 for ``"sum"``. The oracle is fastsparse/reference/feature_flow.py, the kernels
fastsparse.backends.triton.feature_flow; the hooks that collect the maps of a model are the method
(fastsparse/methods/feature_flow.py).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch

from fastsparse import ops, reference
from fastsparse.backends import resolve_backend
from fastsparse.core.checks import as_tensor_list, check_real, check_tensors
from fastsparse.core.contract import FLOW_REDUCTIONS
from fastsparse.core.layout import is_dense

__all__ = ["feature_flow_penalty", "feature_flow_value_and_grads"]

REDUCTIONS = FLOW_REDUCTIONS


def _prepare(features, gradient_weight, curvature_weight, reduction):
    """Validate; return (maps with one dtype, a, b) with a, b the per-element weights."""
    if isinstance(features, torch.Tensor) or not isinstance(features, Iterable):
        raise TypeError("features must be a sequence of tensors (one per layer), not a tensor")
    features = as_tensor_list(features, name="features")
    if not features:
        raise ValueError("features is empty; give at least one feature map")
    check_tensors(features, name="features")
    for i, f in enumerate(features):
        if f.shape != features[0].shape:
            raise ValueError(
                f"feature maps must have one shape: features[0] is {tuple(features[0].shape)}, "
                f"features[{i}] is {tuple(f.shape)}"
            )
    a = check_real("gradient_weight", gradient_weight)
    b = check_real("curvature_weight", curvature_weight)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
    dtype = features[0].dtype
    for f in features[1:]:
        dtype = torch.promote_types(dtype, f.dtype)
    features = [f.to(dtype) for f in features]  # differentiable; a no-op when dtypes agree
    m = max(features[0].numel(), 1) if reduction == "mean" else 1
    return features, a / m, b / m


def _kernel_layout(features: List[torch.Tensor]) -> List[torch.Tensor]:
    """The maps as the kernel needs them: dense, all with the same strides (else contiguous)."""
    stride = features[0].stride()
    if all(is_dense(f) and f.stride() == stride for f in features):
        return features
    return [f.contiguous() for f in features]


def feature_flow_penalty(
    features: Sequence[torch.Tensor],
    *,
    gradient_weight: float = 1.0,
    curvature_weight: float = 1.0,
    reduction: str = "mean",
    backend: Optional[str] = "auto",
) -> torch.Tensor:
    """The feature flow penalty R of L same-shape feature maps, differentiable.

    Args:
        features: L tensors of one shape (any, e.g. (N, C, H, W)) on one device, in the order of
            the flow. Mixed dtypes are promoted. L < 2 gives 0; the curvature term needs L >= 3.
        gradient_weight: weight of sum ||F_{l+1} - F_l||^2 (>= 0).
        curvature_weight: weight of sum ||F_{l+1} - 2 F_l + F_{l-1}||^2 (>= 0).
        reduction: "mean" (divide by the elements of one map) or "sum".
        backend: "auto", "triton" or "torch" (the oracle); see fastsparse/backends/__init__.py.

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 maps); gradients flow to every map in its dtype.
        The fused backend computes the value in one pass over the maps and the gradient in one
        more pass in backward (recomputed, so no gradient buffers are held in between).

    Example:
        >>> f = [torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(3)]
        >>> feature_flow_penalty(f, curvature_weight=0.5).backward()
    """
    features, a, b = _prepare(features, gradient_weight, curvature_weight, reduction)
    name = resolve_backend(backend, features[0].device, op="feature_flow")
    if name == "torch" or features[0].numel() == 0 or len(features) < 2:
        return reference.feature_flow(features, a, b, "sum")
    return ops.call(ops.feature_flow_op, _kernel_layout(features), a, b, name)


def feature_flow_value_and_grads(
    features: Sequence[torch.Tensor],
    *,
    gradient_weight: float = 1.0,
    curvature_weight: float = 1.0,
    reduction: str = "mean",
    backend: Optional[str] = "auto",
) -> tuple[torch.Tensor, List[torch.Tensor]]:
    """(R, [dR/dF_l]) without building a graph: the fused kernel reads every map once and writes
    every gradient once.

    Returns the value (0-dim, fp32 or fp64) and one gradient per map, shaped like it, in the
    promoted dtype of the maps. Feed them to ``torch.autograd.backward(features, grads)`` (or see
    :meth:`FeatureFlow.backward`).

    Example:
        >>> f = [torch.randn(2, 3) for _ in range(4)]
        >>> value, grads = feature_flow_value_and_grads(f, backend="torch")
        >>> [g.shape for g in grads][0]
        torch.Size([2, 3])
    """
    features, a, b = _prepare(features, gradient_weight, curvature_weight, reduction)
    features = [f.detach() for f in features]
    name = resolve_backend(backend, features[0].device, op="feature_flow")
    if name == "torch" or features[0].numel() == 0 or len(features) < 2:
        value = reference.feature_flow(features, a, b, "sum")
        return value, reference.feature_flow_grad(features, a, b, "sum")
    value, grads = ops.call(
        ops.feature_flow_value_and_grads_op, _kernel_layout(features), a, b, name
    )
    return value, list(grads)
