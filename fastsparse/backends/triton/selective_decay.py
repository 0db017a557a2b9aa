"""Fused Triton kernel for selective weight decay of irrelevant weights (Bonetta et al., 2022).

One in-place pass over (weight, grad) for a whole list of tensors: per element

    r = relevance(w, g)      |g * w| ("taylor", default), |w| ("magnitude") or |g| ("gradient")
    irrelevant = r <= tau_t  (tau_t: the threshold of the element's tensor)
    g <- g + lambda * w      where irrelevant (keep_loss_grad=True: extra decay on top of the loss)
    g <- lambda * w          where irrelevant (keep_loss_grad=False: decay only)
    g unchanged              elsewhere (the plain update of the relevant weights)

and the number of irrelevant elements (one partial count per program, added by torch: no atomics).
Tensors are addressed as flat dense blocks through a device-side int64 table
(weight address, grad address, numel, threshold index); a program finds its tensor by binary search
in the item starts, as the penalty kernels do. One launch per (weight dtype, grad dtype) class.

Kernel -> launcher (`selective_decay_`); the torch.library op is registered in
fastsparse/ops.py and the public API is fastsparse/functional/selective_decay.py. The oracle
is fastsparse.reference.selective_decay_grad.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fastsparse.backends.triton.common import (
    TL_DTYPES,
    device_table,
    flat_vector_width,
    launch_options,
    locate,
    typed_pointer,
)
from fastsparse.core.contract import accumulation_dtype

RELEVANCE_IDS = {"taylor": 0, "magnitude": 1, "gradient": 2}
NUM_FIELDS = 4  # weight address, grad address, numel, threshold index
BLOCK = 2048


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _selective_decay_kernel(
    table_ptr,
    item_starts_ptr,
    num_tensors,
    search_steps,
    thresholds_ptr,
    strength_ptr,
    counts_ptr,
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    RELEVANCE: tl.constexpr,
    KEEP_LOSS_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
):
    tensor, block = locate(item_starts_ptr, num_tensors, search_steps)
    row = table_ptr + tensor * 4
    w_ptr = typed_pointer(tl.load(row), W_DTYPE, VEC)
    g_ptr = typed_pointer(tl.load(row + 1), G_DTYPE, VEC)
    numel = tl.load(row + 2)
    if VEC > 0:  # every tensor's numel is a multiple of VEC: the mask is constant over a vector
        numel = tl.multiple_of(numel, VEC)
    tau = tl.load(thresholds_ptr + tl.load(row + 3)).to(ACC)
    strength = tl.load(strength_ptr).to(ACC)

    offsets = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < numel
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(ACC)
    if RELEVANCE == 0:
        relevance = tl.abs(g * w)
    elif RELEVANCE == 1:
        relevance = tl.abs(w)
    else:
        relevance = tl.abs(g)
    irrelevant = (relevance <= tau) & mask
    decay = strength * w
    if KEEP_LOSS_GRAD:
        new = g + tl.where(irrelevant, decay, 0.0)
    else:
        new = tl.where(irrelevant, decay, g)
    tl.store(g_ptr + offsets, new.to(G_DTYPE), mask=mask)
    tl.store(counts_ptr + tl.program_id(0), tl.sum(irrelevant.to(tl.int64), axis=0))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def selective_decay_(
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    thresholds: torch.Tensor,
    threshold_index: Sequence[int],
    strength: float,
    relevance: str,
    keep_loss_grad: bool,
) -> torch.Tensor:
    """Update grads in place (see the module docstring); returns the irrelevant count (int64).

    Every weight must be dense with its grad's strides (fastsparse/functional/selective_decay.py
    prepares them); `thresholds[threshold_index[i]]` is tensor i's threshold.
    """
    device = weights[0].device
    classes: dict = {}
    for i, (w, g) in enumerate(zip(weights, grads)):
        if w.numel():
            classes.setdefault((w.dtype, g.dtype), []).append(i)
    counts = []
    for (w_dtype, g_dtype), members in classes.items():
        acc = accumulation_dtype(torch.promote_types(w_dtype, g_dtype))
        rows, starts = [], [0]
        for i in members:
            numel = weights[i].numel()
            rows.append([weights[i].data_ptr(), grads[i].data_ptr(), numel, threshold_index[i]])
            starts.append(starts[-1] + triton.cdiv(numel, BLOCK))
        table = device_table(tuple(v for row in rows for v in row), torch.int64, device)
        item_starts = device_table(tuple(starts), torch.int64, device)
        programs = starts[-1]
        partial = torch.empty((programs,), dtype=torch.int64, device=device)
        vec = flat_vector_width(
            [weights[i] for i in members] + [grads[i] for i in members],
            [weights[i].numel() for i in members],
        )
        _selective_decay_kernel[(programs,)](
            table,
            item_starts,
            len(members),
            max(1, len(members).bit_length()),
            thresholds.to(acc),
            device_table((float(strength),), acc, device),
            partial,
            W_DTYPE=TL_DTYPES[w_dtype],
            G_DTYPE=TL_DTYPES[g_dtype],
            ACC=TL_DTYPES[acc],
            RELEVANCE=RELEVANCE_IDS[relevance],
            KEEP_LOSS_GRAD=keep_loss_grad,
            BLOCK=BLOCK,
            VEC=vec,
            **launch_options(8),
        )
        counts.append(partial.sum())
    if not counts:
        return torch.zeros((), dtype=torch.int64, device=device)
    return torch.stack(counts).sum()
