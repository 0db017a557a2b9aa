"""Fused Triton kernels for the group penalties, and their launchers.

The engine insight of DESIGN.md: every gradient of the contract is a_g * sign(w) + b_g * w with
per-group coefficients (a_g, b_g) computed from the group's (s1, s2) and, for the across-group
kinds, two per-segment sums (L, F^2). So three kernels serve every kind and grouping:

- `_group_stats_kernel`: per group (or per chunk of a long group) s1 = sum|w|, s2 = sum w^2.
- `_group_rule_kernel`: per group, the value term and (a_g, b_g) from the statistics.
- `_penalty_grad_kernel`: grad = scale * (a_g * sign(w) + b_g * w), optionally added to the old
  gradient. In FUSED mode it first reduces the group held in registers and applies the rule
  itself, so a whole penalty step reads the weights once (within-group kinds, groups that fit
  one block).

A program handles a tile of [BLOCK_G groups, BLOCK_K elements] of one segment (see
fastsparse/layout.py); it finds its segment by binary search in the class's `item_starts`.
Launchers take a cached `Plan` and issue one launch per launch class. Value reductions use no
atomics: per-group terms are written to a buffer and summed with torch, so results are
deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsparse.layout import (
    Plan,
    PlanCache,
    new_empty,
    segment_of_group_map,
    segment_sums,
)

# Kinds as compile-time ids for the coefficient rule.
KIND_IDS = {
    "l1": 0,
    "l2": 1,
    "group_lasso": 2,
    "l1l2": 3,
    "hoyer_square": 4,
    "sparse_group_lasso": 5,
    "group_l1l2": 6,
    "group_hoyer_square": 7,
}
ACROSS_KIND_IDS = (6, 7)

# Fields of a segment's row in a class table (int64).
(
    F_W_ADDR,
    F_GROUPS,
    F_ROWS,
    F_COLS,
    F_STRIDE_GROUP,
    F_STRIDE_ROW,
    F_STRIDE_COL,
    F_STATS_ROW,
    F_CHUNKS,
    F_GROUP_OFFSET,
) = range(10)
NUM_FIELDS = 10

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

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


@triton.jit
def _locate(item_starts_ptr, num_segments, search_steps):
    """(segment, item within segment) of this program, by binary search in item_starts."""
    item = tl.program_id(0).to(tl.int64)
    lo = item * 0
    hi = lo + num_segments
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(item_starts_ptr + mid) <= item
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo, item - tl.load(item_starts_ptr + lo)


@triton.jit
def _tile(table_ptr, segment, local_item, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """Group ids, element offsets and mask of this program's [BLOCK_G, BLOCK_K] tile."""
    row = table_ptr + segment * 10
    groups = tl.load(row + 1)
    rows = tl.load(row + 2)
    cols = tl.load(row + 3)
    stride_group = tl.load(row + 4)
    stride_row = tl.load(row + 5)
    stride_col = tl.load(row + 6)
    chunks = tl.load(row + 8)
    tile = local_item // chunks
    chunk = local_item % chunks
    g = tile * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    j = chunk * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    if rows == 1:  # the common case: no division per element
        element = j * stride_col
    else:
        element = (j // cols) * stride_row + (j % cols) * stride_col
    offsets = g[:, None] * stride_group + element[None, :]
    group_mask = g < groups
    mask = group_mask[:, None] & (j < rows * cols)[None, :]
    return g, chunk, offsets, group_mask, mask


@triton.jit
def _group_stats_kernel(
    table_ptr,
    item_starts_ptr,
    num_segments,
    search_steps,
    out_ptr,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    CHUNKS_PADDED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    segment, local_item = _locate(item_starts_ptr, num_segments, search_steps)
    g, chunk, offsets, group_mask, mask = _tile(table_ptr, segment, local_item, BLOCK_G, BLOCK_K)
    w_ptr = tl.load(table_ptr + segment * 10 + 0).to(tl.pointer_type(W_DTYPE))
    x = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    s1 = tl.sum(tl.abs(x), axis=1)
    s2 = tl.sum(x * x, axis=1)
    out_row = tl.load(table_ptr + segment * 10 + 7) + g
    out = out_ptr + (out_row * CHUNKS_PADDED + chunk) * 2
    tl.store(out, s1, mask=group_mask)
    tl.store(out + 1, s2, mask=group_mask)


@triton.jit
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
    value, a, b = _penalty_rule(s1, s2, total_l, total_f2, KIND, alpha)
    tl.store(values_ptr + g, value, mask=mask)
    tl.store(coef_ptr + 2 * g, a, mask=mask)
    tl.store(coef_ptr + 2 * g + 1, b, mask=mask)


@triton.jit
def _penalty_grad_kernel(
    table_ptr,
    item_starts_ptr,
    num_segments,
    search_steps,
    grad_addrs_ptr,
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
):
    segment, local_item = _locate(item_starts_ptr, num_segments, search_steps)
    g, chunk, offsets, group_mask, mask = _tile(table_ptr, segment, local_item, BLOCK_G, BLOCK_K)
    w_ptr = tl.load(table_ptr + segment * 10 + 0).to(tl.pointer_type(W_DTYPE))
    global_g = tl.load(table_ptr + segment * 10 + 9) + g
    x = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if FUSED:  # the whole group is in registers: reduce, then apply the rule here
        s1 = tl.sum(tl.abs(x), axis=1)
        s2 = tl.sum(x * x, axis=1)
        value, a, b = _penalty_rule(s1, s2, s1 * 0.0, s1 * 0.0, KIND, alpha)
        tl.store(values_ptr + global_g, value, mask=group_mask)
    else:
        a = tl.load(coef_ptr + 2 * global_g, mask=group_mask, other=0.0)
        b = tl.load(coef_ptr + 2 * global_g + 1, mask=group_mask, other=0.0)
    sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    factor = scale
    if HAS_SCALE_PTR:
        factor = factor * tl.load(scale_ptr).to(ACC_DTYPE)
    update = (a[:, None] * sign + b[:, None] * x) * factor
    g_ptr = tl.load(grad_addrs_ptr + segment).to(tl.pointer_type(G_DTYPE))
    if ACCUMULATE:
        update += tl.load(g_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(g_ptr + offsets, update.to(G_DTYPE), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_plans = PlanCache()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plan_acc_dtype(plan: Plan) -> torch.dtype:
    return torch.float64 if any(c.dtype == torch.float64 for c in plan.classes) else torch.float32


def _num_warps(cls) -> int:
    elements = cls.block_groups * cls.block_size
    return 4 if elements <= 2048 else (8 if elements <= 8192 else 16)


def _class_tables(plan: Plan, cls) -> dict:
    """Device-side segment table and item starts of a launch class, built once per plan."""
    tables = cls.device_tables
    if not tables:
        rows, starts, stats_row = [], [0], 0
        for seg in cls.segments:
            geo = seg.geometry
            # Fused classes write statistics at the global group id; split classes write
            # per-chunk partials into a class-local buffer.
            row_in_stats = stats_row if cls.split else seg.group_offset
            rows.append(
                [
                    0,  # weight address, filled per call
                    geo.groups,
                    geo.rows,
                    geo.cols,
                    geo.stride_group,
                    geo.stride_row,
                    geo.stride_col,
                    row_in_stats,
                    seg.chunks,
                    seg.group_offset,
                ]
            )
            starts.append(starts[-1] + cls.items(seg))
            stats_row += geo.groups
        tables["rows"] = rows
        tables["item_starts"] = torch.tensor(starts, dtype=torch.int64).to(plan.device)
        tables["num_items"] = starts[-1]
        tables["search_steps"] = max(1, len(cls.segments).bit_length())
        tables["class_groups"] = stats_row
        if cls.split:
            ids = [
                torch.arange(s.group_offset, s.group_offset + s.geometry.groups)
                for s in cls.segments
            ]
            tables["global_ids"] = torch.cat(ids).to(plan.device)
    return tables


def _address_table(plan: Plan, cls, tensors, key: str):
    """Class table with the current weight addresses (cached while the addresses hold)."""
    tables = _class_tables(plan, cls)
    addresses = tuple(tensors[s.tensor_index].data_ptr() for s in cls.segments)
    if tables.get(key + "_addresses") != addresses:
        rows = [[a, *r[1:]] for a, r in zip(addresses, tables["rows"])]
        tables[key] = torch.tensor(rows, dtype=torch.int64).to(plan.device, non_blocking=True)
        tables[key + "_addresses"] = addresses
    return tables[key]


def _grad_addresses(plan: Plan, cls, grads):
    tables = _class_tables(plan, cls)
    addresses = tuple(grads[s.tensor_index].data_ptr() for s in cls.segments)
    if tables.get("grad_addresses_key") != addresses:
        tensor = torch.tensor(addresses, dtype=torch.int64)
        tables["grad_addresses"] = tensor.to(plan.device, non_blocking=True)
        tables["grad_addresses_key"] = addresses
    return tables["grad_addresses"]


def _launch_stats(plan: Plan, tensors, stats: torch.Tensor, classes) -> None:
    for cls in classes:
        tables = _class_tables(plan, cls)
        table = _address_table(plan, cls, tensors, "weights")
        if cls.split:
            out = torch.zeros(
                (tables["class_groups"], cls.chunks_padded, 2),
                dtype=stats.dtype,
                device=stats.device,
            )
        else:
            out = stats
        _group_stats_kernel[(tables["num_items"],)](
            table,
            tables["item_starts"],
            len(cls.segments),
            tables["search_steps"],
            out,
            W_DTYPE=TL_DTYPES[cls.dtype],
            ACC_DTYPE=TL_DTYPES[_acc_dtype(cls.dtype)],
            CHUNKS_PADDED=cls.chunks_padded,
            BLOCK_G=cls.block_groups,
            BLOCK_K=cls.block_size,
            num_warps=_num_warps(cls),
        )
        if cls.split:
            stats.index_copy_(0, tables["global_ids"], out.sum(dim=1))


def _get_plan(tensors, groupings, grad_dtypes=None) -> Plan:
    plan = _plans.get(tensors, groupings, grad_dtypes)
    plan.classes.sort(key=lambda c: c.grouping_index)  # gradient writes before accumulations
    return plan


def group_stats(tensors, groupings) -> tuple[Plan, torch.Tensor]:
    """Plan and per-group statistics [total_groups, 2] = (s1, s2) for every segment."""
    plan = _get_plan(tensors, groupings)
    stats = torch.zeros((plan.total_groups, 2), dtype=_plan_acc_dtype(plan), device=plan.device)
    _launch_stats(plan, tensors, stats, plan.classes)
    return plan, stats


def _apply_rule(plan: Plan, stats: torch.Tensor, kind: str, alpha: float):
    """Per-group value terms and coefficients [total_groups, 2] = (a, b)."""
    kind_id = KIND_IDS[kind]
    across = kind_id in ACROSS_KIND_IDS
    segment_of_group = segment_of_group_map(plan)
    sums = segment_sums(plan, stats) if across else stats  # unused by the kernel if within
    coefs = new_empty(stats.shape, dtype=stats.dtype, device=stats.device)
    values = new_empty((plan.total_groups,), dtype=stats.dtype, device=stats.device)
    if plan.total_groups:
        _group_rule_kernel[(triton.cdiv(plan.total_groups, RULE_BLOCK),)](
            stats,
            segment_of_group,
            sums,
            coefs,
            values,
            plan.total_groups,
            float(alpha),
            KIND=kind_id,
            ACROSS=across,
            BLOCK=RULE_BLOCK,
        )
    return values, coefs


def _launch_grad(
    plan, cls, tensors, grads, coefs, values, kind, alpha, *, fused, accumulate, scale, scale_tensor
):
    tables = _class_tables(plan, cls)
    _penalty_grad_kernel[(tables["num_items"],)](
        _address_table(plan, cls, tensors, "weights"),
        tables["item_starts"],
        len(cls.segments),
        tables["search_steps"],
        _grad_addresses(plan, cls, grads),
        coefs,
        values,
        float(scale),
        values if scale_tensor is None else scale_tensor,
        float(alpha),
        W_DTYPE=TL_DTYPES[cls.dtype],
        G_DTYPE=TL_DTYPES[cls.grad_dtype],
        ACC_DTYPE=TL_DTYPES[_acc_dtype(cls.dtype)],
        KIND=KIND_IDS[kind],
        FUSED=fused,
        ACCUMULATE=accumulate,
        HAS_SCALE_PTR=scale_tensor is not None,
        BLOCK_G=cls.block_groups,
        BLOCK_K=cls.block_size,
        num_warps=_num_warps(cls),
    )


def penalty_forward(tensors, kind, groupings, alpha):
    """Penalty value (0-dim, accumulation dtype) and per-group coefficients for the backward."""
    plan, stats = group_stats(tensors, groupings)
    values, coefs = _apply_rule(plan, stats, kind, alpha)
    return values.sum(), coefs


def penalty_backward(tensors, coefs, grad_value, kind, groupings, alpha):
    """dR/dW * grad_value for each tensor, in the tensor's dtype and layout."""
    # With several groupings the gradient is summed grouping after grouping: low-precision
    # weights then sum into fp32 buffers, rounded once at the end (as autograd would).
    dtypes = [t.dtype for t in tensors]
    if len(groupings) > 1:
        dtypes = [_acc_dtype(d) for d in dtypes]
    plan = _get_plan(tensors, groupings, dtypes)
    grads = [
        new_empty(t.shape, stride=t.stride(), dtype=d, device=t.device)
        for t, d in zip(tensors, dtypes)
    ]
    scale_tensor = grad_value.reshape(1)
    for cls in plan.classes:
        _launch_grad(
            plan,
            cls,
            tensors,
            grads,
            coefs,
            coefs,
            kind,
            alpha,
            fused=False,
            accumulate=cls.grouping_index > 0,
            scale=1.0,
            scale_tensor=scale_tensor,
        )
    return [g.to(t.dtype) for g, t in zip(grads, tensors)]


def add_penalty_grad(grads, tensors, kind, groupings, alpha, strength):
    """grads[i] += strength * dR/dW_i in place; returns the penalty value (0-dim)."""
    plan = _get_plan(tensors, groupings, [g.dtype for g in grads])
    across = KIND_IDS[kind] in ACROSS_KIND_IDS
    unfused = [c for c in plan.classes if across or c.split]
    acc = _plan_acc_dtype(plan)
    # A float kernel argument is fp32: fp64 weights take the strength from an fp64 tensor.
    scale_tensor = None
    if acc == torch.float64:
        scale_tensor = torch.tensor([strength], dtype=acc).to(plan.device, non_blocking=True)
        strength = 1.0
    if unfused:
        stats = torch.zeros((plan.total_groups, 2), dtype=acc, device=plan.device)
        _launch_stats(plan, tensors, stats, unfused)
        values, coefs = _apply_rule(plan, stats, kind, alpha)
    else:
        values = new_empty((plan.total_groups,), dtype=acc, device=plan.device)
        coefs = values
    for cls in plan.classes:
        _launch_grad(
            plan,
            cls,
            tensors,
            grads,
            coefs,
            values,
            kind,
            alpha,
            fused=not (across or cls.split),
            accumulate=True,
            scale=strength,
            scale_tensor=scale_tensor,
        )
    return values.sum()


def group_norms(tensors, grouping):
    """The group l2 norms of all tensors, concatenated in order (accumulation dtype)."""
    _, stats = group_stats(tensors, (grouping,))
    return torch.sqrt(stats[:, 1])
