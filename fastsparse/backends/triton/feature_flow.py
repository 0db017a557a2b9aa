"""Fused Triton kernel for feature flow regularization (Wu et al., 2021), and its launchers.

For L same-shape feature maps F_0 .. F_{L-1} (the outputs of consecutive blocks), with
D_k = F_{k+1} - F_k (k = 0 .. L-2) and C_k = F_{k+1} - 2 F_k + F_{k-1} (k = 1 .. L-2):

    R = a * sum_k ||D_k||^2 + b * sum_k ||C_k||^2
    dR/dF_l = 2a (D_{l-1} - D_l) + 2b (C_{l-1} - 2 C_l + C_{l+1})

where a D or C outside its index range is 0 (see fastsparse.reference.feature_flow, the oracle).
The gradient of F_l needs F_{l-2} .. F_{l+2}, so one program walks along l over a block of element
positions with a sliding window in registers: it loads F_{l+2}, updates D and C, writes the
gradient of F_l, and adds D_l^2 and C_{l+1}^2 to its value. Every feature map is read once and
every gradient written once; the L maps are addressed through a device-side int64 table of base
addresses (no stacking copy). The value is reduced without atomics: one partial sum per program,
added by torch, so it is deterministic.

Kernel -> launchers (`value`, `grads`, `value_and_grads`); the torch.library ops are registered in
fastsparse/ops.py and the public API is fastsparse/functional/feature_flow.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastsparse.backends.triton.common import (
    TL_DTYPES,
    device_table,
    flat_vector_width,
    launch_options,
    typed_pointer,
)
from fastsparse.core.contract import accumulation_dtype
from fastsparse.core.layout import new_empty

BLOCK = 1024  # element positions per program


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_map(
    addrs_ptr,
    index,
    num_maps,
    offsets,
    mask,
    F_DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    VEC: tl.constexpr,
):
    """F_index[offsets] in the accumulation dtype, or zeros when index >= num_maps."""
    valid = index < num_maps  # a scalar: the mask stays constant over a vector
    address = tl.load(addrs_ptr + tl.minimum(index, num_maps - 1))
    f_ptr = typed_pointer(address, F_DTYPE, VEC)
    return tl.load(f_ptr + offsets, mask=mask & valid, other=0.0).to(ACC)


@triton.jit
def _feature_flow_kernel(
    feature_addrs_ptr,
    grad_addrs_ptr,
    coef_ptr,
    scale_ptr,
    partials_ptr,
    num_maps,
    numel,
    F_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    COMPUTE_VALUE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    if VEC > 0:
        # numel is a multiple of VEC (the launcher checks): written so, the mask is constant
        # over a vector (a multiple_of hint on an argument is dropped).
        numel = (numel // VEC) * VEC
    offsets = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < numel
    a = tl.load(coef_ptr).to(ACC)  # gradient-term weight
    b = tl.load(coef_ptr + 1).to(ACC)  # curvature-term weight
    if HAS_SCALE:  # d(loss)/dR of the backward pass
        s = tl.load(scale_ptr).to(ACC)
        ga = 2.0 * a * s
        gb = 2.0 * b * s
    else:
        ga = 2.0 * a
        gb = 2.0 * b

    f_cur = _load_map(feature_addrs_ptr, 0, num_maps, offsets, mask, F_DTYPE, ACC, VEC)  # F_l
    f_next = _load_map(feature_addrs_ptr, 1, num_maps, offsets, mask, F_DTYPE, ACC, VEC)  # F_{l+1}
    zero = f_cur * 0.0
    d_prev = zero  # D_{l-1}
    c_prev = zero  # C_{l-1}
    c_cur = zero  # C_l
    acc = zero
    for layer in range(0, num_maps):
        f_next2 = _load_map(
            feature_addrs_ptr, layer + 2, num_maps, offsets, mask, F_DTYPE, ACC, VEC
        )
        d_cur = tl.where(layer + 1 < num_maps, f_next - f_cur, 0.0)  # D_l
        c_next = tl.where(layer + 2 < num_maps, f_next2 - 2.0 * f_next + f_cur, 0.0)  # C_{l+1}
        if COMPUTE_VALUE:
            acc += a * d_cur * d_cur + b * c_next * c_next
        if WRITE_GRAD:
            grad = ga * (d_prev - d_cur) + gb * (c_prev - 2.0 * c_cur + c_next)
            g_ptr = typed_pointer(tl.load(grad_addrs_ptr + layer), G_DTYPE, VEC)
            tl.store(g_ptr + offsets, grad.to(G_DTYPE), mask=mask)
        d_prev = d_cur
        c_prev = c_cur
        c_cur = c_next
        f_cur = f_next
        f_next = f_next2
    if COMPUTE_VALUE:
        tl.store(partials_ptr + pid, tl.sum(tl.where(mask, acc, 0.0), axis=0))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _addresses(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return device_table(tuple(t.data_ptr() for t in tensors), torch.int64, device)


def _launch(
    features: Sequence[torch.Tensor],
    grads: Optional[Sequence[torch.Tensor]],
    coefs: tuple[float, float],
    scale: Optional[torch.Tensor],
    compute_value: bool,
) -> Optional[torch.Tensor]:
    """One pass over the maps; returns the value (0-dim, accumulation dtype) if computed.

    `features` must share shape, dtype and strides and be dense (the public function in
    fastsparse/functional/feature_flow.py prepares them); `grads` have the features' strides.
    """
    first = features[0]
    device, numel = first.device, first.numel()
    acc = accumulation_dtype(first.dtype)
    programs = triton.cdiv(numel, BLOCK)
    coef = device_table(tuple(coefs), acc, device)
    partials = new_empty((programs,), dtype=acc, device=device)
    feature_addrs = _addresses(features, device)
    grad_addrs = feature_addrs if grads is None else _addresses(grads, device)
    grad_dtype = first.dtype if grads is None else grads[0].dtype
    vec = flat_vector_width(list(features) + list(grads or []), [numel])
    if programs:
        _feature_flow_kernel[(programs,)](
            feature_addrs,
            grad_addrs,
            coef,
            coef if scale is None else scale,
            partials,
            len(features),
            numel,
            F_DTYPE=TL_DTYPES[first.dtype],
            G_DTYPE=TL_DTYPES[grad_dtype],
            ACC=TL_DTYPES[acc],
            COMPUTE_VALUE=compute_value,
            WRITE_GRAD=grads is not None,
            HAS_SCALE=scale is not None,
            BLOCK=BLOCK,
            VEC=vec,
            **launch_options(4),
        )
    return partials.sum() if compute_value else None


def _new_grads(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [new_empty(f.shape, stride=f.stride(), dtype=f.dtype, device=f.device) for f in features]


def value(features, gradient_weight: float, curvature_weight: float) -> torch.Tensor:
    """R of the feature maps (0-dim, accumulation dtype); reads every map once."""
    return _launch(features, None, (gradient_weight, curvature_weight), None, True)


def grads(features, grad_value: torch.Tensor, gradient_weight: float, curvature_weight: float):
    """grad_value * dR/dF_l for every map, in the maps' dtype and strides (one pass)."""
    out = _new_grads(features)
    scale = grad_value.reshape(1).to(accumulation_dtype(features[0].dtype))
    _launch(features, out, (gradient_weight, curvature_weight), scale, False)
    return out


def value_and_grads(features, gradient_weight: float, curvature_weight: float):
    """(R, [dR/dF_l]) in one pass: every map read once, every gradient written once."""
    out = _new_grads(features)
    total = _launch(features, out, (gradient_weight, curvature_weight), None, True)
    return total, out
