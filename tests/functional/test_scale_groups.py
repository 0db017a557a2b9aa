"""`scale_groups_` (each group times its factor, in place) on every backend against the
oracle: groupings, dtypes, layouts, long groups, coupled groups, masks, and bad calls that change
nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import fastsparse as fs
import fastsparse.reference as ref
from fastsparse.core.layout import group_count
from fastsparse.pruning import coupled_groups
from tests.helpers import (
    ROUNDING_ULPS,
    coupled_models,
    grouping_id,
    make,
    overlapping_groups,
    shapes_for,
)

GROUPINGS = ("filters", "channels", "kernels", None)


def _factors(tensors, grouping, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.rand(group_count(t.shape, grouping), generator=g) for t in tensors]
    for f in out:
        f[::3] = 0.0  # masked groups among the scaled ones
    return out


@pytest.mark.parametrize("grouping", GROUPINGS, ids=grouping_id)
def test_matches_oracle(grouping, backend, device):
    shapes = shapes_for(grouping) + ([(3, 20000)] if grouping != "kernels" else [(2, 2, 9000)])
    tensors = make(shapes, torch.float32, device, seed=5)
    factors = [f.to(device) for f in _factors(tensors, grouping)]
    fused, expected = [t.clone() for t in tensors], [t.clone() for t in tensors]
    fs.scale_groups_(fused, factors, groups=grouping, backend=backend)
    ref.scale_groups_(expected, factors, grouping)
    for f, e in zip(fused, expected):
        torch.testing.assert_close(f, e, rtol=0, atol=0)


def test_oracle_is_the_explicit_product():
    w = torch.randn(4, 3, 2, dtype=torch.float64)
    f = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    expected = w * f[None, :, None]
    ref.scale_groups_(w, [f], "channels")
    torch.testing.assert_close(w, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes_and_layouts(dtype, backend, device):
    base = make([(6, 4, 3, 3)], dtype, device, seed=7)[0]
    factor = _factors([base], "filters")[0].to(device)
    for layout in (
        lambda t: t,
        lambda t: t.to(memory_format=torch.channels_last),
        lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),  # same shape, other strides
    ):
        w, expected = layout(base.clone()), layout(base.clone())
        fs.scale_groups_(w, [factor], groups="filters", backend=backend)
        ref.scale_groups_([expected], [factor], "filters")
        # One rounding of the fp32 (fp64) product to the weights' dtype on both sides.
        exact = layout(base.double() * factor.double().reshape(-1, 1, 1, 1))
        ulps = ROUNDING_ULPS.get(dtype, 0.5) if backend == "triton" else 0.5
        bound = ulps * torch.finfo(dtype).eps * exact.abs()
        assert ((w.double() - exact).abs() <= bound).all()
        assert torch.equal(expected, exact.to(dtype))


def test_bool_masks_zero_dead_groups_exactly(backend, device):
    w = torch.randn(5, 8, device=device)
    before = w.clone()
    keep = torch.tensor([True, False, True, False, True], device=device)
    fs.scale_groups_(w, [keep], backend=backend)
    assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))
    assert torch.equal(w[keep], before[keep])


def test_coupled_groups_match_oracle(backend, device):
    model, x = coupled_models()[1]
    model = model.to(device)
    groups = coupled_groups(model, x.to(device))
    expected_model = copy.deepcopy(model)
    expected_groups = coupled_groups(expected_model, x.to(device))
    factors = [torch.rand(cg.num_groups, device=device) for cg in groups]
    fs.scale_groups_(None, factors, groups=groups, backend=backend)
    ref.scale_groups_(None, factors, expected_groups)
    for p, e in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-6)


def test_overlapping_coupled_groups_multiply_each_factor(backend):
    groups, params = overlapping_groups()  # b.weight: columns in set A, rows in set B
    a_w, a_b, b_w = (p.clone() for p in params)
    factors = [torch.full((cg.num_groups,), 0.5, dtype=torch.float64) for cg in groups]
    fs.scale_groups_(None, factors, groups=groups, backend=backend)
    for p, expected in zip(params, (a_w * 0.5, a_b * 0.5, b_w * 0.25)):
        torch.testing.assert_close(p, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda w: fs.scale_groups_(w, [torch.ones(3)]), ValueError, "has 4 groups"),
        (lambda w: fs.scale_groups_(w, [torch.ones(4)] * 2), ValueError, "2 factor tensors"),
        (lambda w: fs.scale_groups_(w, [torch.ones(4, dtype=torch.int64)]), TypeError, "floating"),
        (lambda w: fs.scale_groups_(w, [[1.0] * 4]), TypeError, "must be tensors"),
        (lambda w: fs.scale_groups_(w, [torch.ones(4)], groups="rows"), ValueError, "grouping"),
        (lambda w: fs.scale_groups_(w, [torch.ones(4)], backend="numpy"), ValueError, "backends"),
    ],
)
def test_bad_calls_change_nothing(call, error, match):
    w = torch.randn(4, 3)
    before = w.clone()
    with pytest.raises(error, match=match):
        call(w)
    assert torch.equal(w, before)
