"""Fused Triton proximal / threshold steps, in place, one read and one write per weight.

Kinds (fastsparse.core.contract.PROX_KINDS; an element is dead when |w| <= t, a group when its l2
norm n <= t):
- "l1": soft threshold sign(w) * max(|w| - t, 0);  "l0": hard threshold w * (|w| > t);
- "group_lasso": w * max(0, 1 - t / n);  "group_l0": w * (n > t);
- "l0_group_lasso": hard threshold the elements (t_elem), then group shrink (t_group) with the
  norm of what survived (Bui et al.'s l0 + l2,1 step).

A program that holds whole groups (FUSED) takes their norms over its tiles, then thresholds them
(one tile: in registers; several: re-read from cache); a group split over programs takes its
norm from a stats pass first and its factor from `factors`. Norms and factors are fp64 from
exactly scaled sums (common.exact_stats), so tiny groups are thresholded as in float64. Every
program also writes the group's (s1, s2) after the step, from which the engine derives the masks
of kept groups.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsparse.backends.triton.common import (
    F_GROUP_OFFSET,
    F_OUT_ROW,
    TL_DTYPES,
    address_table,
    class_tables,
    exact_stats,
    group_sums,
    launch_options,
    launch_reduction,
    launch_vec,
    load_tile,
    locate,
    num_warps,
    scalar,
    scalar_arg,
    table_field,
    tile,
    weight_pointer,
)
from fastsparse.core.contract import PROX_IDS, accumulation_dtype
from fastsparse.core.layout import Plan, selected


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
    """Per-group multiplier of the group kinds (fp64 n and t); 0 for dead groups (n <= t)."""
    alive = n > t
    # Both branches return fp64: the compiler refuses branches of different types, which the
    # interpreter (Python) never notices; where(alive, 1.0, 0.0) alone would be fp32.
    if KIND == 3:  # group_l0
        return tl.where(alive, 1.0, 0.0).to(tl.float64)
    return tl.where(alive, 1.0 - t / tl.where(alive, n, 1.0), 0.0)  # group_lasso, l0_group_lasso


@triton.jit
def _store_prox(
    w_ptr,
    x,
    offsets,
    mask,
    factor,
    KIND: tl.constexpr,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """Store x (after the element step) times the group factor; fp64 (s1, s2) of the result."""
    if KIND >= 2:
        x = x * factor[:, None]
    tl.store(w_ptr + offsets, x.to(W_DTYPE), mask=mask)
    return exact_stats(x, ACC_DTYPE)


@triton.jit(do_not_specialize=["t_elem", "t_group"])
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
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    segment, local_item = locate(item_starts_ptr, num_segments, search_steps)
    g, chunk, offsets, group_mask, mask = tile(
        table_ptr, segment, local_item, 0, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
    )
    w_ptr = weight_pointer(table_ptr, segment, W_DTYPE, VEC)
    t = scalar(t_elem, ACC_DTYPE)
    x = element_step(tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE), t, KIND)
    factor = tl.full([BLOCK_G], 1.0, tl.float64)
    if KIND >= 2:
        if FUSED:  # the group's norm after the element step, then its factor
            if LOOPS == 1:
                s2 = exact_stats(x, ACC_DTYPE)[1]
            else:
                _, s2 = group_sums(
                    table_ptr, segment, local_item, w_ptr, t, KIND == 4, ACC_DTYPE, BLOCK_G,
                    BLOCK_K, LOOPS, VEC, ADJACENT,
                )  # fmt: skip
            factor = prox_factor(tl.sqrt(s2), scalar(t_group, tl.float64), KIND)
        else:
            global_g = table_field(table_ptr, segment, F_GROUP_OFFSET) + g
            factor = tl.load(factors_ptr + global_g, mask=group_mask, other=0.0)
    factor = factor.to(ACC_DTYPE)
    if LOOPS == 1:  # the tile is still in registers
        s1, s2 = _store_prox(w_ptr, x, offsets, mask, factor, KIND, W_DTYPE, ACC_DTYPE)
    else:
        s1 = tl.zeros([BLOCK_G], dtype=tl.float64)
        s2 = tl.zeros([BLOCK_G], dtype=tl.float64)
        for step in range(LOOPS):
            x, offsets, mask = load_tile(
                table_ptr, segment, local_item, step, w_ptr, ACC_DTYPE, BLOCK_G, BLOCK_K, LOOPS,
                VEC, ADJACENT
            )  # fmt: skip
            x = element_step(x, t, KIND)
            c1, c2 = _store_prox(w_ptr, x, offsets, mask, factor, KIND, W_DTYPE, ACC_DTYPE)
            s1 += c1
            s2 += c2
    out_row = table_field(table_ptr, segment, F_OUT_ROW) + g
    out = kept_ptr + (out_row * CHUNKS_PADDED + chunk) * 2
    tl.store(out, s1, mask=group_mask)
    tl.store(out + 1, s2, mask=group_mask)


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
            table = address_table(plan, cls, tensors)
            vec = launch_vec(plan, cls)
            _prox_kernel[(tables["num_items"],)](
                table,
                tables["item_starts"],
                len(cls.segments),
                tables["search_steps"],
                after if factors is None else factors,
                buffer,
                scalar_arg(t_elem, cls.dtype),
                scalar_arg(t_group, torch.float64),
                W_DTYPE=TL_DTYPES[cls.dtype],
                ACC_DTYPE=TL_DTYPES[accumulation_dtype(cls.dtype)],
                KIND=PROX_IDS[kind],
                FUSED=is_fused,
                CHUNKS_PADDED=cls.chunks_padded,
                BLOCK_G=cls.block_groups,
                BLOCK_K=cls.block_size,
                LOOPS=cls.loops,
                VEC=vec,
                ADJACENT=cls.adjacent,
                **launch_options(num_warps(cls, vec)),
            )

        launch_reduction(plan, cls, after, launch)
    return after
