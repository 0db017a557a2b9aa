"""Tiny groups on the fused backends: finite, and equal to the float64 oracle.

A group of fp32 weights with norm 1e-30 has s2 = 1e-60, which fp32 cannot hold (its squares
vanish), and coefficients up to 1/n^3 = 1e90; norms between 1e-23 and 1e-19 give subnormal
fp32 sums. The fused kernels compute statistics, the rule and the factors in fp64 from exactly
scaled sums (docs/design.md, "Exact on tiny norms"), so such groups get the oracle's values,
gradients and prox steps computed on float64 copies.
"""

import pytest
import torch

import fastsparse as fs
from fastsparse import reference as ref
from fastsparse.core.contract import ACROSS_GROUP_KINDS

# Row norms: tiny (sums subnormal in fp32), 1e-20, 1e-30 (squares vanish in fp32), and 1.
ROW_NORMS = (3e-22, 1e-20, 1e-30, 1.0)


def rows_with_norms(norms, cols, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(len(norms), cols, generator=g, dtype=torch.float64)
    rows = rows / rows.norm(dim=1, keepdim=True) * torch.tensor(norms, dtype=torch.float64)[:, None]
    return rows.to(dtype).to(device)


def assert_rows_close(got, expected, rtol, kind=None):
    """Row by row, relative to the row's largest |expected| (rows differ by 1e30 in scale). The
    across-group kinds couple the rows: a row whose terms cancel (w/(nF) - Lw/F^3 for the row that
    carries F) is compared on the scale of the tensor's gradient."""
    assert torch.isfinite(got).all(), got
    got, expected = got.double().cpu(), expected.double().cpu()
    floor = expected.abs().max() if kind in ACROSS_GROUP_KINDS else 0.0
    for r in range(expected.shape[0]):
        scale = max(expected[r].abs().max(), floor)
        assert (got[r] - expected[r]).abs().max() <= rtol * scale, (r, got[r], expected[r])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [6, 20000], ids=["one-block", "split"])
@pytest.mark.parametrize("kind", fs.KINDS)
def test_penalty_value_and_gradient(kind, cols, dtype, device, backend):
    w = rows_with_norms(ROW_NORMS, cols, dtype, device)
    exact = w.double().cpu()
    expected_grad = ref.penalty_grad(exact, kind)[0]
    # Autograd: the coefficients go from the forward to the backward.
    leaf = w.clone().requires_grad_(True)
    value = fs.penalty(leaf, kind, backend=backend)
    value.backward()
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double().cpu(), ref.penalty(exact, kind), rtol=1e-5, atol=0)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is rounded to the dtype
    assert_rows_close(leaf.grad, expected_grad, rtol, kind)
    # In place: statistics, rule and gradient in one pass where the group fits a block.
    param = w.clone().requires_grad_(True)
    fs.add_penalty_grad_(param, kind, 1.0, backend=backend)
    assert_rows_close(param.grad, expected_grad, rtol, kind)


@pytest.mark.parametrize("kind", fs.KINDS)
def test_tiny_rows_alone_are_not_zero_groups(kind, device, backend):
    # Only tiny rows: the value itself is tiny (group_lasso ~1e-20) or scale-free (l1l2).
    w = rows_with_norms(ROW_NORMS[:3], 8, torch.float32, device, seed=1)
    exact = w.double().cpu()
    param = w.clone().requires_grad_(True)
    value = fs.add_penalty_grad_(param, kind, 1.0, backend=backend)
    torch.testing.assert_close(value.double().cpu(), ref.penalty(exact, kind), rtol=1e-5, atol=0)
    assert_rows_close(param.grad, ref.penalty_grad(exact, kind)[0], 1e-5, kind)


@pytest.mark.parametrize("cols", [6, 20000], ids=["one-block", "split"])
@pytest.mark.parametrize("kind", ["group_lasso", "group_l0", "l0_group_lasso"])
def test_group_prox_of_tiny_groups(kind, cols, device, backend):
    # Each tensor's groups have one tiny norm; the threshold cuts between the groups' norms.
    for norm in ROW_NORMS[:3]:
        w = rows_with_norms((norm, 0.5 * norm, 2 * norm), cols, torch.float32, device, seed=2)
        # l0_group_lasso: the element stage drops what is below a tenth of the group's scale.
        t = (0.1 * norm / cols**0.5, 0.7 * norm) if kind == "l0_group_lasso" else 0.7 * norm
        expected = w.double().cpu()
        ref.prox_(expected, kind, t, "filters")
        got = w.clone()
        fs.prox_(got, kind, t, groups="filters", backend=backend)
        assert_rows_close(got, expected, 1e-5)
        assert got[0].abs().max() > 0 and (got[1] == 0).all()  # alive, dead


def test_group_norms_of_tiny_groups(device, backend):
    w = rows_with_norms(ROW_NORMS, 40, torch.float32, device, seed=3)
    norms = fs.group_norms(w, backend=backend)[0]
    torch.testing.assert_close(
        norms.double().cpu(), torch.tensor(ROW_NORMS, dtype=torch.float64), rtol=1e-5, atol=0
    )
