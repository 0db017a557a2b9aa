"""Fused Triton proximal / threshold steps, in place, one read and one write per weight.

Kinds (fastsparse.reference.PROX_KINDS; an element is dead when |w| <= t, a group when its l2
norm n <= t):
- "l1": soft threshold sign(w) * max(|w| - t, 0);  "l0": hard threshold w * (|w| > t);
- "group_lasso": w * max(0, 1 - t / n);  "group_l0": w * (n > t);
- "l0_group_lasso": hard threshold the elements (t_elem), then group shrink (t_group) with the
  norm of what survived (Bui et al.'s l0 + l2,1 step).

A group that fits one block is thresholded in registers (FUSED); a longer one takes its norm from
a stats pass first and its factor from `factors`. Every program also writes the group's
sum of squares after the step, from which the engine derives the masks of kept groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsparse.core.contract import PROX_IDS, accumulation_dtype
from fastsparse.core.layout import Plan, selected
from fastsparse.kernels.common import (
    F_GROUP_OFFSET,
    F_OUT_ROW,
    TL_DTYPES,
    address_table,
    class_tables,
    launch_reduction,
    locate,
    num_warps,
    table_field,
    tile,
    weight_pointer,
)


@triton.jit
def element_step(x, t, KIND: tl.constexpr):
    """The element stage of a prox kind: soft (l1) or hard (l0, l0_group_lasso) threshold."""
    if KIND == 0:
        x = tl.where(x > 0, 1.0, -1.0) * tl.maximum(tl.abs(x) - t, 0.0)
    if KIND == 1 or KIND == 4:
        x = tl.where(tl.abs(x) > t, x, 0.0)
    return x


@triton.jit
def prox_factor(n, t, KIND: tl.constexpr):
    """Per-group multiplier of the group kinds; 0 for dead groups (n <= t)."""
    alive = n > t
    if KIND == 3:  # group_l0
        return tl.where(alive, 1.0, 0.0)
    return tl.where(alive, 1.0 - t / tl.where(alive, n, 1.0), 0.0)  # group_lasso, l0_group_lasso


@triton.jit
def _prox_kernel(
    table_ptr,
    item_starts_ptr,
    num_segments,
    search_steps,
    factors_ptr,
    kept_ptr,
    t_elem,
    t_group,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    KIND: tl.constexpr,
    FUSED: tl.constexpr,
    CHUNKS_PADDED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    segment, local_item = locate(item_starts_ptr, num_segments, search_steps)
    g, chunk, offsets, group_mask, mask = tile(table_ptr, segment, local_item, BLOCK_G, BLOCK_K)
    w_ptr = weight_pointer(table_ptr, segment, W_DTYPE)
    x = element_step(tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE), t_elem, KIND)
    if KIND >= 2:
        if FUSED:
            factor = prox_factor(tl.sqrt(tl.sum(x * x, axis=1)), t_group, KIND)
        else:
            global_g = table_field(table_ptr, segment, F_GROUP_OFFSET) + g
            factor = tl.load(factors_ptr + global_g, mask=group_mask, other=0.0).to(ACC_DTYPE)
        x = x * factor[:, None]
    tl.store(w_ptr + offsets, x.to(W_DTYPE), mask=mask)
    out_row = table_field(table_ptr, segment, F_OUT_ROW) + g
    out = kept_ptr + (out_row * CHUNKS_PADDED + chunk) * 2
    tl.store(out, tl.sum(tl.abs(x), axis=1), mask=group_mask)
    tl.store(out + 1, tl.sum(x * x, axis=1), mask=group_mask)


def prox(plan: Plan, tensors, select, kind: str, t_elem: float, t_group: float, factors):
    """Threshold the selected classes in place; returns [total_groups, 2] (s1, s2) after the step.

    `factors` [total_groups] are the group kinds' multipliers for classes whose groups do not fit
    one block, and for kind "scale" (None: every selected class must fit or be elementwise).
    """
    after = torch.zeros((plan.total_groups, 2), dtype=torch.float64, device=plan.device)
    if factors is not None:
        factors = factors.to(torch.float64)
    for cls in selected(plan.classes, select):
        tables = class_tables(plan, cls)
        is_fused = kind != "scale" and (not cls.split or PROX_IDS[kind] < 2)
        if not is_fused and factors is None:
            raise ValueError("group prox on groups longer than one block needs factors")

        def launch(buffer, cls=cls, tables=tables, is_fused=is_fused):
            _prox_kernel[(tables["num_items"],)](
                address_table(plan, cls, tensors),
                tables["item_starts"],
                len(cls.segments),
                tables["search_steps"],
                after if factors is None else factors,
                buffer,
                float(t_elem),
                float(t_group),
                W_DTYPE=TL_DTYPES[cls.dtype],
                ACC_DTYPE=TL_DTYPES[accumulation_dtype(cls.dtype)],
                KIND=PROX_IDS[kind],
                FUSED=is_fused,
                CHUNKS_PADDED=cls.chunks_padded,
                BLOCK_G=cls.block_groups,
                BLOCK_K=cls.block_size,
                num_warps=num_warps(cls),
            )

        launch_reduction(plan, cls, after, launch)
    return after
