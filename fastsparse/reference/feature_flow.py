"""The oracle of feature flow regularization (Wu et al., 2021)."""

from __future__ import annotations

from typing import Sequence

import torch

from fastsparse.core.contract import accumulation_dtype_of


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
    dtype = accumulation_dtype_of(features)
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
