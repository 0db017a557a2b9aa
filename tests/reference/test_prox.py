"""The oracle's proximal / threshold step (fastsparse.reference.prox_) against explicit
per-group formulas written with Python loops."""

import pytest
import torch

import fastsparse.reference as ref
from fastsparse.core.contract import PROX_KINDS
from tests.helpers import explicit_prox

GROUPINGS = ("filters", "channels", "kernels", None)


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
@pytest.mark.parametrize("kind", PROX_KINDS)
def test_oracle_matches_explicit_formula(kind, grouping):
    torch.manual_seed(0)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    w[2] = 0.0  # an all-zero filter stays zero and never gives NaN
    t = 0.9 if grouping in ("filters", "channels") else 0.5
    t = 0.3 * t if grouping is None else t
    expected, expected_kept = explicit_prox(w, kind, t, grouping)
    (kept,) = ref.prox_([w], kind, t, grouping)
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(kept, expected_kept)
    assert not w.isnan().any()
