"""How the fused kernels address a tensor's groups (fastsparse.core.layout): the odd shapes that
every kernel test runs on (tests/helpers.py) each take the layout path they are there for, and
together they cover every path of the launch plan."""

import math

import pytest
import torch

from fastsparse.core.contract import as_groupings
from fastsparse.core.layout import MAX_FUSED_GROUP, SPLIT_BLOCK, TILE_ELEMENTS, build_plan
from tests.helpers import GROUPINGS, ODD_SHAPES, applies, shapes_for


def plan_of(shape, grouping):
    """(segment, launch class) of one contiguous tensor of `shape` under one grouping."""
    plan = build_plan([torch.zeros(shape)], [(0, grouping, 0)])
    (segment,) = plan.segments
    (launch,) = plan.classes
    return segment, launch


def single_element(shape):
    for grouping in ("filters", "channels", None):
        segment, _ = plan_of(shape, grouping)
        assert (segment.geometry.groups, segment.geometry.group_size) == (1, 1), grouping


def odd_row_length(shape):
    segment, launch = plan_of(shape, "filters")
    geometry = segment.geometry
    assert (geometry.groups, geometry.group_size) == (7, 13)
    assert launch.block_size == 16 > geometry.group_size  # a masked tail in every group
    assert launch.block_groups == 8 > geometry.groups  # a partial tile of groups
    segment, _ = plan_of(shape, "channels")  # a column: its elements are 13 apart
    assert (segment.geometry.cols, segment.geometry.stride_col) == (7, 13)


def kernels_of_a_conv(shape):
    segment, _ = plan_of(shape, "kernels")
    assert (segment.geometry.groups, segment.geometry.group_size) == (3 * 5, 3 * 3)
    segment, _ = plan_of(shape, "channels")  # a 3 x 9 block with rows 45 apart
    geometry = segment.geometry
    assert (geometry.rows, geometry.stride_row, geometry.cols, geometry.stride_col) == (3, 45, 9, 1)


def single_input_channel(shape):
    segment, _ = plan_of(shape, "channels")
    assert segment.geometry.groups == 1 and segment.geometry.group_size == math.prod(shape)


def strided_channels_and_split(shape):
    segment, _ = plan_of(shape, "channels")  # rows of 25 elements, 500 apart
    geometry = segment.geometry
    assert (geometry.groups, geometry.rows, geometry.stride_row, geometry.cols) == (20, 50, 500, 25)
    assert not segment.split
    segment, launch = plan_of(shape, None)  # 25000 elements: partial sums per chunk
    assert segment.geometry.group_size == 25000 > MAX_FUSED_GROUP
    assert segment.split and launch.split and segment.chunks == -(-25000 // SPLIT_BLOCK)
    for grouping in ("filters", "kernels"):
        assert not plan_of(shape, grouping)[0].split, grouping


def bias_vector(shape):
    assert [g for g in ("filters", "channels", "kernels", None) if applies(g, shape)] == [
        "filters",
        None,
    ]
    segment, _ = plan_of(shape, "filters")
    assert (segment.geometry.groups, segment.geometry.group_size) == (7, 1)


PATH_OF_SHAPE = {
    (1, 1): single_element,
    (7, 13): odd_row_length,
    (3, 5, 3, 3): kernels_of_a_conv,
    (20, 1, 5, 5): single_input_channel,
    (50, 20, 5, 5): strided_channels_and_split,
    (7,): bias_vector,
}


def test_every_odd_shape_has_a_path():
    assert sorted(PATH_OF_SHAPE, key=str) == sorted(ODD_SHAPES, key=str)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_shape_takes_its_layout_path(shape):
    PATH_OF_SHAPE[shape](shape)


def test_odd_shapes_cover_every_layout_path():
    """Over the (grouping, shape) pairs the kernel tests run (shapes_for each grouping of
    GROUPINGS), every kind of segment and launch class appears."""
    seen = set()
    for groups in GROUPINGS:
        for shape in shapes_for(groups):
            for grouping in as_groupings(groups):
                segment, launch = plan_of(shape, grouping)
                geometry = segment.geometry
                seen.add("split" if segment.split else "fused")
                if geometry.group_size == 1:
                    seen.add("one-element groups")
                if geometry.group_size < launch.block_size:
                    seen.add("masked block")
                if not segment.split and geometry.groups % launch.block_groups:
                    seen.add("partial tile")
                if launch.block_groups > 1:
                    seen.add("several groups per program")
                if geometry.rows > 1:
                    seen.add("strided rows")
                if geometry.cols > 1 and geometry.stride_col > 1:
                    seen.add("strided columns")
                if launch.adjacent:
                    seen.add("adjacent groups")
    assert seen == {
        "split",
        "fused",
        "one-element groups",
        "masked block",
        "partial tile",
        "several groups per program",
        "strided rows",
        "strided columns",
        "adjacent groups",
    }
    # Groupings that need more dims leave the small shapes out, and only those.
    assert shapes_for("channels") == [s for s in ODD_SHAPES if len(s) >= 2]
    assert shapes_for("kernels") == [(3, 5, 3, 3), (20, 1, 5, 5), (50, 20, 5, 5)]


@pytest.mark.parametrize("cols", [9, 4096, 4097, 11008, 14336, 16384, 16385, 40000])
def test_no_tile_holds_more_than_tile_elements(cols):
    # Long groups are walked in tiles (loops) instead of held in one register tile.
    plan = build_plan([torch.zeros(3, cols)], [(0, "filters", 0)])
    (launch,) = plan.classes
    assert launch.block_groups * launch.block_size <= TILE_ELEMENTS
    per_program = launch.block_size * launch.loops
    if cols <= MAX_FUSED_GROUP:  # one program per group, in ceil(cols / block) tiles
        assert (
            not launch.split
            and per_program >= cols
            and launch.loops == -(-cols // launch.block_size)
        )
    else:  # chunks of SPLIT_BLOCK elements, one program each
        assert launch.split and per_program == SPLIT_BLOCK
