"""Property-based: random shapes, kinds and groupings, each fused backend against the oracle."""

import pytest
import torch
from conftest import FUSED_BACKENDS
from helpers import applies, gradient_scale, term_magnitude
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsparse as fs
from fastsparse import reference as ref

GROUPING_CHOICES = [
    "filters",
    "channels",
    "kernels",
    None,
    ("filters", "channels"),
    ("kernels", None),
]


@st.composite
def cases(draw):
    grouping = draw(st.sampled_from(GROUPING_CHOICES))
    count = draw(st.integers(1, 4))
    shapes = []
    while len(shapes) < count:
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
        if applies(grouping, shape):
            shapes.append(shape)
    kind = draw(st.sampled_from(fs.KINDS))
    seed = draw(st.integers(0, 2**16))
    zero_first = draw(st.booleans())
    return grouping, shapes, kind, seed, zero_first


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_fused_backends_match_oracle(backend, case):
    from conftest import TRITON_DEVICE

    grouping, shapes, kind, seed, zero_first = case
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen).to(TRITON_DEVICE) for s in shapes]
    if zero_first:
        tensors[0].zero_()
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    value = fs.penalty(leaves, kind, groups=grouping, backend=backend)
    value.backward()
    expected = ref.penalty([t.double() for t in tensors], kind, grouping)
    expected_grads = ref.penalty_grad([t.double() for t in tensors], kind, grouping)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    scale = gradient_scale(expected_grads)
    for t, leaf, e in zip(tensors, leaves, expected_grads):
        terms = torch.clamp(term_magnitude(t, kind, grouping), min=scale)
        assert torch.isfinite(leaf.grad).all()
        assert ((leaf.grad.double() - e).abs() <= 1e-5 * terms).all()
