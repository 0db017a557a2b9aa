"""What every Triton kernel of fastsparse shares: segment lookup, tiles, class tables.

A program handles LOOPS tiles of [BLOCK_G groups, BLOCK_K elements] of one segment, one after the
other (see fastsparse/core/layout.py); it finds its segment by binary search in its launch class's
`item_starts`, then reads the segment's row of the class table (int64 fields below, addresses
included: pointer tables, so one launch serves tensors of any shapes).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
import triton
import triton.language as tl

from fastsparse.core.contract import accumulation_dtype
from fastsparse.core.layout import Plan

# Fields of a segment's row in a class table (int64), in order; kernels read a field at
# `table_ptr + segment * NUM_FIELDS + F_<FIELD>`.
TABLE_FIELDS = (
    "w_addr",  # the weight's address, filled per call
    "groups",
    "rows",
    "cols",
    "stride_group",
    "stride_row",
    "stride_col",
    "out_row",  # where the group's outputs go (global group id, or class-local row if split)
    "chunks",
    "group_offset",  # the segment's first global group id
)
NUM_FIELDS = tl.constexpr(len(TABLE_FIELDS))
(
    F_W_ADDR,
    F_GROUPS,
    F_ROWS,
    F_COLS,
    F_STRIDE_GROUP,
    F_STRIDE_ROW,
    F_STRIDE_COL,
    F_OUT_ROW,
    F_CHUNKS,
    F_GROUP_OFFSET,
) = (tl.constexpr(i) for i in range(len(TABLE_FIELDS)))

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def locate(item_starts_ptr, num_segments, search_steps):
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
def tile(
    table_ptr,
    segment,
    local_item,
    step,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    """Group ids, chunk, element offsets and masks of tile `step` (< LOOPS) of this program:
    [BLOCK_G groups, BLOCK_K elements] from element (chunk * LOOPS + step) * BLOCK_K on.

    ADJACENT (LaunchClass.adjacent): group g + 1 starts one element after group g and groups
    are single strided runs, so offsets are contiguous across groups and Triton lays threads
    along them (coalesced accesses, no division).

    VEC > 0 (LaunchClass.vector, with 16-byte aligned addresses): every group is a contiguous
    run whose length and start are multiples of VEC elements or, with ADJACENT, groups come in
    multiples of VEC and element offsets are multiples of VEC. Offsets and masks are then built
    so that Triton can prove it (int32 indices; a 64-bit mask defeats the analysis) and loads and
    stores take 16 bytes at a time."""
    row = table_ptr + segment * NUM_FIELDS
    groups = tl.load(row + F_GROUPS)
    rows = tl.load(row + F_ROWS)
    cols = tl.load(row + F_COLS)
    stride_group = tl.load(row + F_STRIDE_GROUP)
    stride_row = tl.load(row + F_STRIDE_ROW)
    stride_col = tl.load(row + F_STRIDE_COL)
    chunks = tl.load(row + F_CHUNKS)
    # 32-bit: a 64-bit division is a subroutine call on the GPU (program ids fit 31 bits)
    tile_index = (local_item.to(tl.int32) // chunks.to(tl.int32)).to(tl.int64)
    chunk = (local_item.to(tl.int32) % chunks.to(tl.int32)).to(tl.int64)
    g = tile_index * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    group_mask = g < groups
    if ADJACENT:
        j = (chunk * LOOPS + step) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        element = j * stride_col  # rows == 1
        g32 = (tile_index * BLOCK_G).to(tl.int32) + tl.arange(0, BLOCK_G)
        if VEC > 0:
            # Hints in this function: Triton reads them off the op that made the value, not off
            # a called function's argument or a branch's result.
            element = tl.multiple_of(element, VEC)
            group_mask = g32 < tl.multiple_of(groups.to(tl.int32), VEC)
        offsets = g32.to(tl.int64)[:, None] + element[None, :]  # stride_group == 1
        mask = group_mask[:, None] & (j < cols)[None, :]
        return g, chunk, offsets, group_mask, mask
    if VEC > 0:
        j32 = ((chunk * LOOPS + step) * BLOCK_K).to(tl.int32) + tl.arange(0, BLOCK_K)
        starts = tl.multiple_of(g * stride_group, VEC)
        offsets = starts[:, None] + j32.to(tl.int64)[None, :]
        mask = group_mask[:, None] & (j32 < tl.multiple_of(cols.to(tl.int32), VEC))[None, :]
        return g, chunk, offsets, group_mask, mask
    j = (chunk * LOOPS + step) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    if rows == 1:  # the common case: no division per element
        element = j * stride_col
    else:
        element = (j // cols) * stride_row + (j % cols) * stride_col
    offsets = g[:, None] * stride_group + element[None, :]
    mask = group_mask[:, None] & (j < rows * cols)[None, :]
    return g, chunk, offsets, group_mask, mask


@triton.jit
def tile_offsets(
    table_ptr,
    segment,
    local_item,
    step,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    """(offsets, mask) of tile `step`: what a loop over tiles needs of `tile`."""
    _, _, offsets, _, mask = tile(
        table_ptr, segment, local_item, step, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
    )
    return offsets, mask


@triton.jit
def load_tile(
    table_ptr,
    segment,
    local_item,
    step,
    ptr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    """(values in ACC_DTYPE, offsets, mask) of tile `step` of the tensor at `ptr`."""
    offsets, mask = tile_offsets(
        table_ptr, segment, local_item, step, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
    )
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE), offsets, mask


@triton.jit
def group_sums(
    table_ptr,
    segment,
    local_item,
    ptr,
    threshold,
    HARD_THRESHOLD: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    """fp64 (s1, s2) per group over the program's LOOPS tiles (`exact_stats`); with
    HARD_THRESHOLD, of the elements with |w| > threshold only."""
    s1 = tl.zeros([BLOCK_G], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_G], dtype=tl.float64)
    for step in range(LOOPS):
        x, _, _ = load_tile(
            table_ptr, segment, local_item, step, ptr, ACC_DTYPE, BLOCK_G, BLOCK_K, LOOPS, VEC,
            ADJACENT
        )  # fmt: skip
        if HARD_THRESHOLD:
            x = tl.where(tl.abs(x) > threshold, x, 0.0)
        c1, c2 = exact_stats(x, ACC_DTYPE)
        s1 += c1
        s2 += c2
    return s1, s2


@triton.jit
def exact_stats(x, ACC_DTYPE: tl.constexpr):
    """(s1, s2) per row of x [BLOCK_G, BLOCK_K] in fp64, exact for tiny rows as well.

    fp32 squares of elements below 1e-19 are subnormal and below 1e-23 vanish: each row is
    scaled by the power of two that brings its largest |x| into [1, 2) (exact), summed in fp32,
    and the sums are unscaled in fp64. fp64 rows are summed as they are."""
    ax = tl.abs(x)
    s1 = tl.sum(ax, axis=1).to(tl.float64)
    if ACC_DTYPE == tl.float64:
        return s1, tl.sum(x * x, axis=1)
    exponent = ((tl.max(ax, axis=1).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    shift = tl.minimum(tl.maximum(-exponent, -126), 127)
    scale = ((shift + 127) << 23).to(tl.float32, bitcast=True)
    unscale = ((1023 - shift).to(tl.int64) << 52).to(tl.float64, bitcast=True)  # exact 1 / scale
    u = x * scale[:, None]
    return s1, tl.sum(u * u, axis=1).to(tl.float64) * unscale * unscale


@triton.jit
def split_coefficient(b, ACC_DTYPE: tl.constexpr):
    """(hi, pre) in ACC_DTYPE with b * x == hi * (x * pre) for fp64 coefficients b.

    pre is a power of two near sqrt(|b|): the b = 1/n^3 of a group of norm 1e-30 (1e90) does
    not fit fp32, but b * x of its elements does."""
    if ACC_DTYPE == tl.float64:
        return b, b * 0.0 + 1.0
    exponent = ((b.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023
    half = tl.minimum(tl.maximum(exponent >> 1, -126), 126)
    pre = ((half + 1023) << 52).to(tl.float64, bitcast=True)
    inverse = ((1023 - half) << 52).to(tl.float64, bitcast=True)  # exact 1 / pre, no division
    return (b * inverse).to(ACC_DTYPE), pre.to(ACC_DTYPE)


# fp64 scalars travel as their bits XOR this mask (a signalling-NaN pattern). Triton types an
# int argument by its range (i32 or i64), so the bits of 0.0 (and of subnormals) alone would
# give another signature, a recompile the first time a threshold leaves 0; under the mask only
# NaN payloads and tiny negative subnormals fall in the i32 range.
FLOAT64_BITS_MASK = tl.constexpr(0x7FF4000000000000)


@triton.jit
def scalar(x, ACC_DTYPE: tl.constexpr):
    """A float argument in ACC_DTYPE. Triton passes Python floats as fp32, so fp64 kernels get
    the double's bits as an int64, masked (see `scalar_arg`)."""
    if ACC_DTYPE == tl.float64:
        return tl.cast(tl.cast(x, tl.int64) ^ FLOAT64_BITS_MASK, tl.float64, bitcast=True)
    return tl.cast(x, ACC_DTYPE)


@triton.jit
def typed_pointer(address, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """An int64 address as a pointer; 16-byte aligned when VEC > 0 (checked by the launcher)."""
    pointer = address.to(tl.pointer_type(DTYPE))
    if VEC > 0:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def weight_pointer(table_ptr, segment, W_DTYPE: tl.constexpr, VEC: tl.constexpr):
    return typed_pointer(tl.load(table_ptr + segment * NUM_FIELDS + F_W_ADDR), W_DTYPE, VEC)


@triton.jit
def table_field(table_ptr, segment, FIELD: tl.constexpr):
    """One int64 field of a segment's row."""
    return tl.load(table_ptr + segment * NUM_FIELDS + FIELD)


def scalar_arg(x: float, dtype: torch.dtype):
    """A float kernel argument read by `scalar` for accumulation dtype `dtype`: the value (fp32
    in the kernel), or for fp64 the bits of the double as an int, XOR `FLOAT64_BITS_MASK`.

    Kernels list every such parameter in `do_not_specialize`: Triton would otherwise compile a
    new specialization whenever the value (its bits) changed between 1, a multiple of 16 and
    anything else, as a threshold does from one step to the next."""
    if accumulation_dtype(dtype) == torch.float64:
        bits = struct.unpack("<q", struct.pack("<d", float(x)))[0]
        return bits ^ int(FLOAT64_BITS_MASK.value)
    return float(x)


def flat_vector_width(tensors: Sequence[torch.Tensor], sizes: Iterable[int]) -> int:
    """VEC of a launch over flat dense tensors: the elements in 16 bytes of the narrowest dtype
    when every tensor is 16-byte aligned and every size (elements per tensor) a multiple of
    that, else 0 (element by element)."""
    width = 16 // min(t.element_size() for t in tensors)
    aligned = all(t.data_ptr() % 16 == 0 for t in tensors) and all(n % width == 0 for n in sizes)
    return width if aligned else 0


def launch_vec(plan: Plan, cls, *roles: str) -> int:
    """VEC for a launch of `cls`, once its address tables are built: cls.vector
    (core.layout.vector_width) when the weights and every table named in `roles` ("grad",
    "state0", ...) are 16-byte aligned, else 0."""
    tables = class_tables(plan, cls)
    aligned = tables.get("weight_aligned") and all(tables.get(f"{r}_aligned") for r in roles)
    return cls.vector if aligned else 0


# 32-bit registers of an SM (sm_80, sm_90), the most one block can hold.
REGISTER_FILE = 65536


def launch_options(warps: int) -> dict:
    """num_warps and maxnreg of a launch: the register limit is the most a thread of a block of
    `warps` can have. Knowing the block size, ptxas otherwise spills a few registers to fit
    more blocks on an SM; these kernels stream weights and keep their loads in registers."""
    return {"num_warps": warps, "maxnreg": min(255, REGISTER_FILE // (32 * warps))}


def num_warps(cls, vec: int = 0) -> int:
    elements = cls.block_groups * cls.block_size
    # From the ahead-of-time compile table (benchmarks/gpu_static.py). About 8 elements a
    # thread up to 2048, so that 16-byte accesses fill a thread. A single group's 4096 tile
    # with strided addressing needs 168-222 registers a thread at 8 warps (one block an SM);
    # at 16 warps it fits the 128 a thread then has, without a spill.
    if elements <= 2048:
        return max(1, min(4, elements // 256))
    return 16 if cls.block_groups == 1 and not vec else 8


def class_tables(plan: Plan, cls) -> dict:
    """Geometry rows, item starts and sizes of a launch class, built once per plan."""
    tables = cls.device_tables
    if not tables:
        rows, starts, class_row = [], [0], 0
        for seg in cls.segments:
            geo = seg.geometry
            # Single-chunk classes write per-group outputs at the global group id; split classes
            # write per-chunk partials into a class-local buffer, added up afterwards.
            out_row = class_row if cls.split else seg.group_offset
            fields = {
                "w_addr": 0,
                "groups": geo.groups,
                "rows": geo.rows,
                "cols": geo.cols,
                "stride_group": geo.stride_group,
                "stride_row": geo.stride_row,
                "stride_col": geo.stride_col,
                "out_row": out_row,
                "chunks": seg.chunks,
                "group_offset": seg.group_offset,
            }
            rows.append([fields[name] for name in TABLE_FIELDS])
            starts.append(starts[-1] + cls.items(seg))
            class_row += geo.groups
        tables["rows"] = rows
        tables["item_starts"] = torch.tensor(starts, dtype=torch.int64).to(plan.device)
        tables["num_items"] = starts[-1]
        tables["search_steps"] = max(1, len(cls.segments).bit_length())
        tables["class_groups"] = class_row
        if cls.split:
            ids = [
                torch.arange(s.group_offset, s.group_offset + s.geometry.groups)
                for s in cls.segments
            ]
            tables["global_ids"] = torch.cat(ids).to(plan.device)
    return tables


def address_table(plan: Plan, cls, tensors) -> torch.Tensor:
    """The class table with the current weight addresses (cached while the addresses hold)."""
    tables = class_tables(plan, cls)
    addresses = tuple(tensors[s.tensor_index].data_ptr() for s in cls.segments)
    tables["weight_aligned"] = all(a % 16 == 0 for a in addresses)

    def build():
        rows = [[a, *r[1:]] for a, r in zip(addresses, tables["rows"])]
        return torch.tensor(rows, dtype=torch.int64).to(plan.device, non_blocking=True)

    return _kept(tables, "table", addresses, build)


# Tables kept per class and role: work launched (or captured in a CUDA graph) with a table keeps
# it alive while calls alternate between a few address sets (autograd and in-place gradients).
KEPT_TABLES = 8


def _kept(tables: dict, name: str, key: tuple, build) -> torch.Tensor:
    """tables[name][key], built by build() the first time; the last KEPT_TABLES stay."""
    kept = tables.setdefault(name, OrderedDict())
    tensor = kept.get(key)
    if tensor is None:
        tensor = kept[key] = build()
        if len(kept) > KEPT_TABLES:
            kept.popitem(last=False)
    else:
        kept.move_to_end(key)
    return tensor


def _uploaded(plan: Plan, tables: dict, name: str, values: tuple) -> torch.Tensor:
    """An int64 device tensor of `values`, kept in tables[name] (copied once per value set)."""
    return _kept(
        tables, name, values,
        lambda: torch.tensor(values, dtype=torch.int64).to(plan.device, non_blocking=True),
    )  # fmt: skip


def grad_addresses(plan: Plan, cls, grads, name: str = "grad") -> torch.Tensor:
    """Per segment of the class, the address of the gradient it writes (or of another tensor
    laid out like the weight: `name` keeps one cached table per role, e.g. optimizer states)."""
    tables = class_tables(plan, cls)
    addresses = tuple(grads[s.tensor_index].data_ptr() for s in cls.segments)
    tables[f"{name}_aligned"] = all(a % 16 == 0 for a in addresses)
    return _uploaded(plan, tables, f"{name}_addresses", addresses)


def relative_addresses(plan: Plan, cls, grads, name: str = "grad") -> tuple[torch.Tensor, int]:
    """(offsets, base): per segment of the class, the address of the gradient it writes minus
    `base`, the first one's. Gradients that keep their distances (the flat buffers of
    engine.penalty_backward_flat) keep the table wherever they land: only `base`, a kernel argument,
    changes, so nothing is uploaded (a CUDA graph capture refuses pageable copies)."""
    tables = class_tables(plan, cls)
    addresses = tuple(grads[s.tensor_index].data_ptr() for s in cls.segments)
    tables[f"{name}_aligned"] = all(a % 16 == 0 for a in addresses)
    base = addresses[0]
    return _uploaded(plan, tables, f"{name}_offsets", tuple(a - base for a in addresses)), base


def launch_reduction(plan: Plan, cls, out: torch.Tensor, launch) -> None:
    """Run a kernel writing per-group pairs into out [total_groups, 2].

    `launch(partials, chunks_padded)` starts the kernel; a single-chunk class writes straight
    into `out`, a split class into a zeroed [class_groups, chunks_padded, 2] buffer whose chunks
    are then added in order (deterministic) and copied to the classes' global rows.
    """
    tables = class_tables(plan, cls)
    if not cls.split:
        launch(out)
        return
    partials = torch.zeros(
        (tables["class_groups"], cls.chunks_padded, 2), dtype=out.dtype, device=out.device
    )
    launch(partials)
    out.index_copy_(0, tables["global_ids"], partials.sum(dim=1))


_TABLES: OrderedDict = OrderedDict()
_TABLES_CAPACITY = 256


def device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant table on `device`, cached by its values (no copy when seen before)."""
    key = (values, dtype, device)
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_CAPACITY:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table
