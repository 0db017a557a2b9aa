"""Fused Triton kernels for the group penalties, and their launchers.

The engine insight (docs/design.md): every gradient of the contract is a_g * sign(w) + b_g * w with
per-group coefficients (a_g, b_g) computed from the group's (s1, s2) and, for the across-group
kinds, two per-segment sums (L, F^2). So three kernels serve every kind and grouping:

- `_group_stats_kernel`: per group (or per chunk of a long group) s1 = sum|w|, s2 = sum w^2.
- `_group_rule_kernel`: per group, the value term and (a_g, b_g) from the statistics.
- `_penalty_grad_kernel`: grad = scale * (a_g * sign(w) + b_g * w), optionally added to the old
  gradient. In FUSED mode it first reduces the program's whole groups (over its tiles) and
  applies the rule itself, so a whole penalty step reads the weights from memory once
  (within-group kinds, groups that are not split).

Statistics, the rule and the coefficients are fp64 (COEFFICIENT_DTYPE) from exactly scaled sums
(common.exact_stats), and b_g * w is applied as hi * (w * pre) (common.split_coefficient): groups
of norm 1e-30 get the float64 result, not zeros, infinities or NaN.

The launchers below are the Triton backend's primitives (stats, rule, apply, fused,
prepare_fused), which fastsparse/engine.py composes into the ops. One launch per launch class
(common.py). Value reductions use no atomics: per-group terms go to a buffer summed with torch,
so results are deterministic.
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
    relative_addresses,
    scalar,
    scalar_arg,
    split_coefficient,
    table_field,
    tile,
    typed_pointer,
    weight_pointer,
)
from fastsparse.core.contract import (
    ACROSS_GROUP_KINDS,
    COEFFICIENT_DTYPE,
    KIND_IDS,
    accumulation_dtype,
)
from fastsparse.core.layout import Plan, PlanCache, new_empty, selected

ACROSS_KIND_IDS = tuple(KIND_IDS[k] for k in ACROSS_GROUP_KINDS)
RULE_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _penalty_rule(s1, s2, total_l, total_f2, KIND: tl.constexpr, alpha):
    """(value term, a, b) per group; zero groups give zeros, never NaN."""
    nonzero = s2 > 0
    safe_s2 = tl.where(nonzero, s2, 1.0)
    inv_n = tl.where(nonzero, 1.0 / tl.sqrt(safe_s2), 0.0)
    n = s2 * inv_n
    zero = s1 * 0.0
    if KIND == 0:  # l1
        value, a, b = s1, zero + 1.0, zero
    elif KIND == 1:  # l2
        value, a, b = 0.5 * s2, zero, zero + 1.0
    elif KIND == 2:  # group_lasso
        value, a, b = n, zero, inv_n
    elif KIND == 3:  # l1l2: s1 / n
        value, a, b = s1 * inv_n, inv_n, -s1 * inv_n * inv_n * inv_n
    elif KIND == 4:  # hoyer_square: s1^2 / s2
        ratio = s1 * inv_n * inv_n
        value, a, b = s1 * ratio, 2.0 * ratio, -2.0 * ratio * ratio
    elif KIND == 5:  # sparse_group_lasso
        value, a, b = alpha * s1 + (1.0 - alpha) * n, zero + alpha, (1.0 - alpha) * inv_n
    else:
        f_positive = total_f2 > 0
        inv_f2 = tl.where(f_positive, 1.0 / tl.where(f_positive, total_f2, 1.0), 0.0)
        if KIND == 6:  # group_l1l2: L / F
            inv_f = tl.sqrt(inv_f2)
            value, a, b = n * inv_f, zero, inv_n * inv_f - total_l * inv_f * inv_f2
        else:  # group_hoyer_square: L^2 / F^2
            value = n * total_l * inv_f2
            a = zero
            b = 2.0 * total_l * inv_f2 * inv_n - 2.0 * total_l * total_l * inv_f2 * inv_f2
    return (
        tl.where(nonzero, value, 0.0),
        tl.where(nonzero, a, 0.0),
        tl.where(nonzero, b, 0.0),
    )


@triton.jit(do_not_specialize=["threshold"])
def _group_stats_kernel(
    table_ptr,
    item_starts_ptr,
    num_segments,
    search_steps,
    out_ptr,
    threshold,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    HARD_THRESHOLD: tl.constexpr,
    CHUNKS_PADDED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    """fp64 (s1, s2) per group and chunk; with HARD_THRESHOLD, of w where |w| > threshold only."""
    segment, local_item = locate(item_starts_ptr, num_segments, search_steps)
    g, chunk, _, group_mask, _ = tile(
        table_ptr, segment, local_item, 0, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
    )
    w_ptr = weight_pointer(table_ptr, segment, W_DTYPE, VEC)
    s1, s2 = group_sums(
        table_ptr, segment, local_item, w_ptr, scalar(threshold, ACC_DTYPE), HARD_THRESHOLD,
        ACC_DTYPE, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
    )  # fmt: skip
    out_row = table_field(table_ptr, segment, F_OUT_ROW) + g
    out = out_ptr + (out_row * CHUNKS_PADDED + chunk) * 2
    tl.store(out, s1, mask=group_mask)
    tl.store(out + 1, s2, mask=group_mask)


@triton.jit(do_not_specialize=["alpha"])
def _group_rule_kernel(
    stats_ptr,
    segment_of_group_ptr,
    segment_sums_ptr,
    coef_ptr,
    values_ptr,
    total_groups,
    alpha,
    KIND: tl.constexpr,
    ACROSS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = g < total_groups
    s1 = tl.load(stats_ptr + 2 * g, mask=mask, other=0.0)
    s2 = tl.load(stats_ptr + 2 * g + 1, mask=mask, other=0.0)
    if ACROSS:
        segment = tl.load(segment_of_group_ptr + g, mask=mask, other=0).to(tl.int64)
        total_l = tl.load(segment_sums_ptr + 2 * segment, mask=mask, other=0.0)
        total_f2 = tl.load(segment_sums_ptr + 2 * segment + 1, mask=mask, other=0.0)
    else:
        total_l = s1 * 0.0
        total_f2 = total_l
    value, a, b = _penalty_rule(s1, s2, total_l, total_f2, KIND, scalar(alpha, tl.float64))
    tl.store(values_ptr + g, value, mask=mask)
    tl.store(coef_ptr + 2 * g, a, mask=mask)
    tl.store(coef_ptr + 2 * g + 1, b, mask=mask)


@triton.jit
def _store_grad(
    g_ptr,
    x,
    offsets,
    mask,
    a,
    hi,
    pre,
    ACCUMULATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
):
    """grad [+]= a * sign(x) + hi * (x * pre) on one tile (per-group a, hi, pre)."""
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    update = a[:, None] * sign + hi[:, None] * (x * pre[:, None])
    if ACCUMULATE:
        update += tl.load(g_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(g_ptr + offsets, update.to(G_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["scale", "alpha"])
def _penalty_grad_kernel(
    table_ptr,
    item_starts_ptr,
    num_segments,
    search_steps,
    grad_offsets_ptr,
    grad_base,
    coef_ptr,
    values_ptr,
    scale,
    scale_ptr,
    alpha,
    W_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    KIND: tl.constexpr,
    FUSED: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_SCALE_PTR: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    segment, local_item = locate(item_starts_ptr, num_segments, search_steps)
    g, _, offsets, group_mask, mask = tile(
        table_ptr, segment, local_item, 0, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
    )
    w_ptr = weight_pointer(table_ptr, segment, W_DTYPE, VEC)
    global_g = table_field(table_ptr, segment, F_GROUP_OFFSET) + g
    x = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if FUSED:  # the program holds whole groups: reduce, then apply the rule here
        if LOOPS == 1:
            s1, s2 = exact_stats(x, ACC_DTYPE)
        else:
            s1, s2 = group_sums(
                table_ptr, segment, local_item, w_ptr, 0.0, False, ACC_DTYPE, BLOCK_G, BLOCK_K,
                LOOPS, VEC, ADJACENT
            )  # fmt: skip
        value, a, b = _penalty_rule(s1, s2, s1 * 0.0, s1 * 0.0, KIND, scalar(alpha, tl.float64))
        tl.store(values_ptr + global_g, value, mask=group_mask)
    else:
        a = tl.load(coef_ptr + 2 * global_g, mask=group_mask, other=0.0)
        b = tl.load(coef_ptr + 2 * global_g + 1, mask=group_mask, other=0.0)
    # The scale folds into the fp64 coefficients; b * w is applied as hi * (w * pre).
    factor = scalar(scale, tl.float64)
    if HAS_SCALE_PTR:
        factor = factor * tl.load(scale_ptr).to(tl.float64)
    hi, pre = split_coefficient(b * factor, ACC_DTYPE)
    a = (a * factor).to(ACC_DTYPE)
    g_ptr = typed_pointer(grad_base + tl.load(grad_offsets_ptr + segment), G_DTYPE, VEC)
    if LOOPS == 1:  # the tile is still in registers
        _store_grad(g_ptr, x, offsets, mask, a, hi, pre, ACCUMULATE, ACC_DTYPE, G_DTYPE)
    else:
        for step in range(LOOPS):
            x, offsets, mask = load_tile(
                table_ptr, segment, local_item, step, w_ptr, ACC_DTYPE, BLOCK_G, BLOCK_K, LOOPS,
                VEC, ADJACENT
            )  # fmt: skip
            _store_grad(g_ptr, x, offsets, mask, a, hi, pre, ACCUMULATE, ACC_DTYPE, G_DTYPE)


# --------------------------------------------------------------------------------------------
# Launchers: the Triton backend's primitives (see fastsparse/engine.py)
# --------------------------------------------------------------------------------------------

plans = PlanCache()


def stats(plan: Plan, tensors, select, element_threshold=None) -> torch.Tensor:
    """[total_groups, 2] = (s1, s2) of the selected classes' groups (others stay 0).

    With `element_threshold`, only elements with |w| > threshold count (for l0 + group prox).
    """
    out = torch.zeros((plan.total_groups, 2), dtype=COEFFICIENT_DTYPE, device=plan.device)
    for cls in selected(plan.classes, select):
        tables = class_tables(plan, cls)

        def launch(buffer, cls=cls, tables=tables):
            table = address_table(plan, cls, tensors)
            vec = launch_vec(plan, cls)
            _group_stats_kernel[(tables["num_items"],)](
                table,
                tables["item_starts"],
                len(cls.segments),
                tables["search_steps"],
                buffer,
                scalar_arg(element_threshold or 0.0, cls.dtype),
                W_DTYPE=TL_DTYPES[cls.dtype],
                ACC_DTYPE=TL_DTYPES[accumulation_dtype(cls.dtype)],
                HARD_THRESHOLD=element_threshold is not None,
                CHUNKS_PADDED=cls.chunks_padded,
                BLOCK_G=cls.block_groups,
                BLOCK_K=cls.block_size,
                LOOPS=cls.loops,
                VEC=vec,
                ADJACENT=cls.adjacent,
                **launch_options(num_warps(cls, vec)),
            )

        launch_reduction(plan, cls, out, launch)
    return out


def rule(stats_, segment_of_group, segment_sums_, kind: str, alpha: float):
    """Per-group value terms [groups] and coefficients [groups, 2] = (a, b) from statistics."""
    groups = stats_.shape[0]
    kind_id = KIND_IDS[kind]
    coefs = new_empty(stats_.shape, dtype=stats_.dtype, device=stats_.device)
    values = new_empty((groups,), dtype=stats_.dtype, device=stats_.device)
    if groups:
        _group_rule_kernel[(triton.cdiv(groups, RULE_BLOCK),)](
            stats_,
            segment_of_group,
            segment_sums_.to(stats_.dtype),
            coefs,
            values,
            groups,
            scalar_arg(alpha, torch.float64),
            KIND=kind_id,
            ACROSS=kind_id in ACROSS_KIND_IDS,
            BLOCK=RULE_BLOCK,
            **launch_options(4),
        )
    return values, coefs


def _prepare_grad(plan, cls, tensors, grads, kind, alpha, fused, accumulate, scale_tensor):
    """The gradient kernel of one class prepared for these tensors' addresses:
    launch(coefs, values, scale) runs it."""
    tables = class_tables(plan, cls)
    table = address_table(plan, cls, tensors)
    grad_offsets, grad_base = relative_addresses(plan, cls, grads)
    vec = launch_vec(plan, cls, "grad")
    grid, count, steps = (tables["num_items"],), len(cls.segments), tables["search_steps"]
    alpha = scalar_arg(alpha, torch.float64)
    constants = dict(
        W_DTYPE=TL_DTYPES[cls.dtype],
        G_DTYPE=TL_DTYPES[cls.grad_dtype],
        ACC_DTYPE=TL_DTYPES[accumulation_dtype(cls.dtype)],
        KIND=KIND_IDS[kind],
        FUSED=fused,
        ACCUMULATE=accumulate,
        HAS_SCALE_PTR=scale_tensor is not None,
        BLOCK_G=cls.block_groups,
        BLOCK_K=cls.block_size,
        LOOPS=cls.loops,
        VEC=vec,
        ADJACENT=cls.adjacent,
        **launch_options(num_warps(cls, vec)),
    )

    def launch(coefs, values, scale):
        _penalty_grad_kernel[grid](
            table,
            tables["item_starts"],
            count,
            steps,
            grad_offsets,
            grad_base,
            coefs,
            values,
            scalar_arg(scale, torch.float64),
            values if scale_tensor is None else scale_tensor,
            alpha,
            **constants,
        )

    return launch


def apply(plan, tensors, grads, coefs, select, *, accumulate, scale, scale_tensor=None):
    """grads [+]= scale * scale_tensor * (a_g sign(w) + b_g w) on the selected classes."""
    if scale_tensor is not None:
        scale_tensor = scale_tensor.reshape(1)
    coefs = coefs.to(COEFFICIENT_DTYPE)
    for cls in selected(plan.classes, select):
        # KIND only matters in FUSED mode: a fixed one avoids a compilation per kind here.
        launch = _prepare_grad(
            plan, cls, tensors, grads, "l1", 0.0, False, accumulate, scale_tensor
        )
        launch(coefs, coefs, scale)


def prepare_fused(plan, tensors, grads, select, kind, alpha):
    """`fused` prepared for these tensors' addresses: launch(scale, values) runs it
    (None when no class is selected). The caller keeps the tensors alive and unchanged."""
    launches = [
        _prepare_grad(plan, cls, tensors, grads, kind, alpha, True, True, None)
        for cls in selected(plan.classes, select)
    ]
    if not launches:
        return None

    def launch(scale, values):
        for one in launches:
            one(values, values, scale)

    return launch


def fused(plan, tensors, grads, select, kind, alpha, scale, values):
    """One pass per group for within-group kinds: values[g] and grads += scale * dR/dw."""
    launch = prepare_fused(plan, tensors, grads, select, kind, alpha)
    if launch is not None:
        launch(scale, values)
