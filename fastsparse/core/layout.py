"""How a (tensor, grouping) pair is laid out for the fused kernels, and the launch plan.

Every grouping of the contract is addressed through strides, without transposed copies: the
elements of group g are

    base + g * stride_group + r * stride_row + c * stride_col,  r < rows, c < cols,

so one group is a [rows, cols] strided block and group_size = rows * cols. This "segment"
geometry covers "filters", "channels", "kernels" and None on contiguous, channels_last and most
sliced tensors; a tensor it cannot describe is handled on a contiguous copy by the caller.

A *plan* cuts a list of tensors into segments following a list of specs (tensor, grouping, pass),
numbers their groups globally (segment after segment) and sorts the segments into launch classes:
one launch per (pass, dtypes, block shape). A tensor appears once per pass at most, so the
segments of one pass may write gradients concurrently; passes run one after the other. For a
tuple of groupings the specs are the cross product (pass = grouping index); coupled groups give
one spec per (parameter, dim) they touch. The plan is backend-neutral: the Triton launcher turns
each class into a device-side int64 table, the native one each selection of segments. Plans are
cached by the tensors' addresses, shapes and strides.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

# A program holds at most TILE_ELEMENTS elements in registers at once (larger tiles spill at any
# warp count); several short groups share a tile. A group of at most MAX_FUSED_GROUP elements is
# one program's: it walks the group in `loops` tiles to reduce it, then again to apply the rule,
# the second walk reading from cache (one tile: straight from registers), so weights are read
# from memory once. Longer groups are split into chunks of SPLIT_BLOCK elements, one program
# each, whose partial sums are added.
TILE_ELEMENTS = 4096
MAX_FUSED_GROUP = 16384
SPLIT_BLOCK = MAX_FUSED_GROUP
MIN_BLOCK = 16
# Groups side by side in memory (stride_group == 1: the "channels" of a Linear weight) are tiled
# across groups, so that neighbouring threads read neighbouring addresses: at least
# ADJACENT_GROUPS groups a tile (a 32-byte sector of bf16 per element), elements walked in
# blocks of TILE_ELEMENTS // ADJACENT_GROUPS.
ADJACENT_GROUPS = 16


@dataclass(frozen=True)
class SegmentGeometry:
    groups: int
    rows: int
    cols: int
    stride_group: int
    stride_row: int
    stride_col: int

    @property
    def group_size(self) -> int:
        return self.rows * self.cols


def group_dims(dim: int, grouping: Optional[str]) -> tuple[int, ...]:
    """The dims whose indices enumerate the groups (row-major), for a tensor of `dim` dims."""
    if grouping == "filters":
        return (0,) if dim >= 1 else ()
    if grouping == "channels":
        return (1,)
    if grouping == "kernels":
        return (0, 1)
    return ()


def _collapse_group_dims(sizes, strides):
    """One (count, stride) for dims enumerated row-major, or None when they do not collapse."""
    dims = [(s, st) for s, st in zip(sizes, strides) if s != 1]
    count = math.prod(sizes)
    if not dims:
        return count, 0
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_size * inner_stride:
            return None
    return count, dims[-1][1]


def _collapse_element_dims(sizes, strides):
    """At most two (size, stride) pairs covering the dims in any order, or None."""
    dims = sorted(((s, st) for s, st in zip(sizes, strides) if s != 1), key=lambda d: -d[1])
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == size * stride:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (rows, stride_row), (cols, stride_col) = merged
    return rows, stride_row, cols, stride_col


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a block of memory exactly once (any dim order)."""
    return _is_dense(tuple(t.shape), tuple(t.stride()))


@functools.lru_cache(maxsize=4096)
def _is_dense(shape: tuple, stride: tuple) -> bool:
    expected = 1
    for size, st in sorted(zip(shape, stride), key=lambda d: d[1]):
        if size == 1:
            continue
        if st != expected:
            return False
        expected *= size
    return True


def segment_geometry(t: torch.Tensor, grouping: Optional[str]) -> Optional[SegmentGeometry]:
    """The strided description of t's groups, or None if strides cannot express it."""
    return _segment_geometry(tuple(t.shape), tuple(t.stride()), grouping)


# Cached: every call of an op describes every tensor, and a model has hundreds of them.
@functools.lru_cache(maxsize=4096)
def _segment_geometry(sizes: tuple, strides: tuple, grouping) -> Optional[SegmentGeometry]:
    if not _is_dense(sizes, strides):
        return None
    gdims = group_dims(len(sizes), grouping)
    collapsed = _collapse_group_dims([sizes[d] for d in gdims], [strides[d] for d in gdims])
    if collapsed is None:
        return None
    rest = [d for d in range(len(sizes)) if d not in gdims]
    elements = _collapse_element_dims([sizes[d] for d in rest], [strides[d] for d in rest])
    if elements is None:
        return None
    groups, stride_group = collapsed
    rows, stride_row, cols, stride_col = elements
    return SegmentGeometry(groups, rows, cols, stride_group, stride_row, stride_col)


def addressable(t: torch.Tensor, groupings) -> bool:
    """True if the fused kernels can address every grouping of t through its strides."""
    return all(segment_geometry(t, g) is not None for g in groupings)


def group_count(shape: Sequence[int], grouping: Optional[str]) -> int:
    """Number of groups of a tensor of this shape (a 0-dim tensor is one group)."""
    return math.prod(shape[d] for d in group_dims(len(shape), grouping))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass
class Segment:
    tensor_index: int
    pass_index: int
    geometry: SegmentGeometry
    group_offset: int  # first global group id
    segment_id: int
    chunks: int = 1

    @property
    def split(self) -> bool:
        """A group longer than one block: partial sums per chunk, added in a second step."""
        return self.chunks > 1


@dataclass
class LaunchClass:
    """Segments that go through one kernel launch (same pass, dtypes and block shape)."""

    pass_index: int
    dtype: torch.dtype
    grad_dtype: torch.dtype
    block_groups: int
    block_size: int  # elements of a group per tile
    loops: int  # tiles per program: a program covers block_size * loops elements of a group
    adjacent: bool  # groups side by side in memory (`adjacent_groups`): tiles run across them
    vector: int  # elements per 16 bytes when tiles take 16-byte accesses (`vector_width`), or 0
    chunks_padded: int  # 1 for fused classes; rows of the partial-sum buffer otherwise
    segments: list[Segment] = field(default_factory=list)
    device_tables: dict = field(default_factory=dict)  # filled lazily by a backend

    @property
    def split(self) -> bool:
        """Groups longer than one block: partial sums per chunk, added in a second step."""
        return self.chunks_padded > 1

    def items(self, segment: Segment) -> int:
        """Programs this segment needs: tiles of block_groups groups, times chunks."""
        tiles = -(-segment.geometry.groups // self.block_groups)
        return tiles * segment.chunks


@dataclass
class Plan:
    segments: list[Segment]
    classes: list[LaunchClass]
    total_groups: int
    device: torch.device
    cache: dict = field(default_factory=dict)  # backend-owned device tensors


def adjacent_groups(geometry: SegmentGeometry) -> bool:
    """True when group g + 1 starts one element after group g and a group's elements are one
    strided run (the "channels" of a row-major matrix or of a channels_last conv weight, the
    "filters" of a transposed matrix): tiles then run across groups (group ids in int32)."""
    return geometry.stride_group == 1 and 1 < geometry.groups < 2**31 and geometry.rows == 1


def _block_shape(geometry: SegmentGeometry) -> tuple[int, int, int, int]:
    """(block_groups, block_size, loops, chunks) for a segment."""
    size = geometry.group_size
    largest = TILE_ELEMENTS // ADJACENT_GROUPS if adjacent_groups(geometry) else TILE_ELEMENTS
    block_size = min(max(MIN_BLOCK, next_power_of_2(size)), largest)
    block_groups = max(1, min(TILE_ELEMENTS // block_size, next_power_of_2(geometry.groups)))
    if size <= MAX_FUSED_GROUP:
        return block_groups, block_size, -(-size // block_size), 1
    return block_groups, block_size, SPLIT_BLOCK // block_size, -(-size // SPLIT_BLOCK)


def vector_width(geometry: SegmentGeometry, dtype: torch.dtype) -> int:
    """Elements per 16 bytes when a tile's accesses can take 16 bytes at a time (from a 16-byte
    aligned base: checked per call), else 0: each group is one contiguous run whose start and
    length are multiples of that, or groups are adjacent, as many as a multiple of that, with
    element strides multiples of that."""
    width = 16 // dtype.itemsize
    if adjacent_groups(geometry):
        aligned = geometry.groups % width == 0 and geometry.stride_col % width == 0
        return width if aligned else 0
    contiguous = geometry.rows == 1 and geometry.stride_col == 1 and geometry.cols < 2**31
    aligned = geometry.cols % width == 0 and (
        geometry.groups == 1 or geometry.stride_group % width == 0
    )
    return width if contiguous and aligned else 0


Spec = tuple  # (tensor index, grouping, pass index)


def cross_specs(num_tensors: int, groupings: Sequence[Optional[str]]) -> list[Spec]:
    """Every grouping on every tensor; grouping i runs in pass i."""
    return [(ti, g, gi) for ti in range(num_tensors) for gi, g in enumerate(groupings)]


def build_plan(
    tensors: Sequence[torch.Tensor],
    specs: Sequence[Spec],
    grad_dtypes: Optional[Sequence[torch.dtype]] = None,
) -> Plan:
    """Cut tensors into segments following `specs` and sort them into launch classes.

    `grad_dtypes` (default: the tensors' dtypes) are the dtypes of the gradients the kernels
    write, part of a class's key. Every tensor must be one `segment_geometry` can describe
    (callers pass contiguous copies of the others). Empty tensors get no segment.
    """
    segments, classes = [], {}
    offset = 0
    for ti, grouping, pass_index in specs:
        t = tensors[ti]
        if t.numel() == 0:
            continue
        geometry = segment_geometry(t, grouping)
        if geometry is None:
            raise ValueError(f"tensor {ti} has a layout the fused kernels cannot address")
        block_groups, block_size, loops, chunks = _block_shape(geometry)
        segment = Segment(ti, pass_index, geometry, offset, len(segments), chunks)
        segments.append(segment)
        offset += geometry.groups
        grad_dtype = t.dtype if grad_dtypes is None else grad_dtypes[ti]
        key = (pass_index, t.dtype, grad_dtype, block_groups, block_size, loops)
        key += (adjacent_groups(geometry), vector_width(geometry, t.dtype))
        key += (next_power_of_2(chunks),)
        if key not in classes:
            classes[key] = LaunchClass(*key)
        classes[key].segments.append(segment)
    device = tensors[0].device if tensors else torch.device("cpu")
    ordered = sorted(classes.values(), key=lambda c: c.pass_index)
    return Plan(segments, ordered, offset, device)


class Select(NamedTuple):
    """Which segments (or launch classes) a primitive works on; None means any."""

    pass_index: Optional[int] = None
    split: Optional[bool] = None


ALL = Select()


def selected(items: Sequence, select: Select) -> list:
    """The segments or launch classes of a selection (both have .pass_index and .split)."""
    pass_index, split = select
    return [
        item
        for item in items
        if (pass_index is None or item.pass_index == pass_index)
        and (split is None or item.split == split)
    ]


def passes(plan: Plan) -> range:
    return range(1 + max((s.pass_index for s in plan.segments), default=0))


def segment_of_group_map(plan: Plan) -> torch.Tensor:
    """int32 [total_groups]: the segment of each global group id (cached on the plan)."""
    if "segment_of_group" not in plan.cache:
        counts = torch.tensor([s.geometry.groups for s in plan.segments], dtype=torch.int64)
        ids = torch.repeat_interleave(torch.arange(len(plan.segments), dtype=torch.int32), counts)
        plan.cache["segment_of_group"] = ids.to(plan.device)
        plan.cache["segment_lengths"] = counts.to(plan.device)
    return plan.cache["segment_of_group"]


def segment_sums(plan: Plan, stats: torch.Tensor) -> torch.Tensor:
    """[segments, 2] = (L, F^2) per segment from per-group stats [total_groups, 2] = (s1, s2).

    L = sum of the group norms, F^2 = sum of s2: the per-tensor sums of the across-group kinds.
    segment_reduce adds each segment in order, without atomics: deterministic.
    """
    segment_of_group_map(plan)
    lengths = plan.cache["segment_lengths"]
    s2 = stats[:, 1].contiguous()
    total_l = torch.segment_reduce(torch.sqrt(s2), "sum", lengths=lengths, unsafe=True)
    total_f2 = torch.segment_reduce(s2, "sum", lengths=lengths, unsafe=True)
    return torch.stack([total_l, total_f2], dim=1)


def new_empty(shape, *, dtype, device, stride=None) -> torch.Tensor:
    """Every uninitialized output buffer of the backends comes from here.

    Tests replace it with a NaN-filling version, so that an element a kernel forgot to write
    fails the test.
    """
    if stride is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


class FlatLayout(NamedTuple):
    """Tensors side by side in one flat buffer per dtype (`flat_layout`)."""

    dtypes: tuple  # the buffers' dtypes, in order of first appearance
    sizes: tuple  # elements of each buffer
    buffer: tuple  # per tensor, the index of its buffer
    offset: tuple  # per tensor, its first element in that buffer (a 16-byte boundary)


def flat_layout(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]) -> FlatLayout:
    """Where tensors shaped and strided like `tensors`, of `dtypes`, lie in flat buffers: one
    buffer per dtype, each tensor starting on a 16-byte boundary (so 16-byte accesses stay
    possible). Tensors of one buffer keep their distances wherever the buffer is allocated."""
    key = tuple(zip(map(torch.Tensor.size, tensors), map(torch.Tensor.stride, tensors), dtypes))
    try:
        return _flat_layout(key)
    except TypeError:  # symbolic sizes (torch.compile, dynamic shapes) do not hash
        return _flat_layout.__wrapped__(key)


# Cached: every backward asks twice (the op and the views), a model has hundreds of tensors.
@functools.lru_cache(maxsize=256)
def _flat_layout(key: tuple) -> FlatLayout:
    order, sizes, buffer, offset = [], [], [], []
    for shape, stride, dtype in key:
        if dtype not in order:
            order.append(dtype)
            sizes.append(0)
        b = order.index(dtype)
        align = max(1, 16 // dtype.itemsize)
        start = -(-sizes[b] // align) * align
        extent = 0 if 0 in shape else 1 + sum((n - 1) * st for n, st in zip(shape, stride))
        buffer.append(b)
        offset.append(start)
        sizes[b] = start + extent
    return FlatLayout(tuple(order), tuple(sizes), tuple(buffer), tuple(offset))


def flat_views(tensors: Sequence[torch.Tensor], layout: FlatLayout, flats) -> list:
    """Per tensor, its view into `flats` (buffers allocated following `layout`), shaped and
    strided like the tensor."""
    return [
        flats[b].as_strided(t.shape, t.stride(), o)
        for t, b, o in zip(tensors, layout.buffer, layout.offset)
    ]


def tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class PlanCache:
    """A small LRU of plans keyed by the tensors' addresses and layouts and the groupings.

    A plan holds only addresses and geometry, so a hit is valid even if a tensor was freed and
    another of the same layout took its place.
    """

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._plans: OrderedDict = OrderedDict()

    def get(
        self,
        tensors: Sequence[torch.Tensor],
        specs: Sequence[Spec],
        grad_dtypes: Optional[Sequence[torch.dtype]] = None,
    ) -> Plan:
        dtypes = None if grad_dtypes is None else tuple(grad_dtypes)
        key = (tuple(tensor_key(t) for t in tensors), tuple(specs), dtypes)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(tensors, specs, grad_dtypes)
            self._plans[key] = plan
            if len(self._plans) > self.capacity:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def clear(self) -> None:
        self._plans.clear()


def encode_groupings(groupings: Sequence[Optional[str]]) -> str:
    """Groupings as one string for torch.library schemas: ("filters", None) -> "filters,none"."""
    return ",".join("none" if g is None else g for g in groupings)


def decode_groupings(text: str) -> tuple[Optional[str], ...]:
    return tuple(None if g == "none" else g for g in text.split(","))


def encode_specs(specs: Sequence[Spec]) -> str:
    """Explicit specs as a string: [(0, "filters", 0), (2, "channels", 0)] becomes
    "@0:filters,2:channels".

    Pass indices are not encoded: decode_specs numbers a tensor's specs in order of appearance.
    """
    return "@" + ",".join(f"{ti}:{encode_groupings((g,))}" for ti, g, _ in specs)


def decode_specs(text: str, num_tensors: int) -> list[Spec]:
    """Specs from a groupings string ("filters,channels": the cross product) or encode_specs."""
    if not text.startswith("@"):
        return cross_specs(num_tensors, decode_groupings(text))
    specs, seen = [], {}
    for item in text[1:].split(","):
        index, grouping = item.split(":")
        ti = int(index)
        specs.append((ti, decode_groupings(grouping)[0], seen.get(ti, 0)))
        seen[ti] = seen.get(ti, 0) + 1
    return specs
