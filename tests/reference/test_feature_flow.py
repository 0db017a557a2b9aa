"""The feature flow oracle (fastsparse.reference.feature_flow): values by hand and the gradient
against its closed form."""

import pytest
import torch

from fastsparse import reference as ref
from tests.helpers import feature_maps, flow_closed_form_grads


def test_oracle_value_by_hand():
    f = [torch.zeros(2, 3), torch.ones(2, 3), 3 * torch.ones(2, 3)]
    # gradient terms 1 + 4 (per element), curvature 1 (per element)
    assert ref.feature_flow(f, 1.0, 1.0, "mean").item() == pytest.approx(6.0)
    assert ref.feature_flow(f, 0.5, 2.0, "sum").item() == pytest.approx(6 * (0.5 * 5 + 2 * 1))
    assert ref.feature_flow(f[:1]).item() == 0.0
    assert ref.feature_flow(f[:2], 1.0, 5.0, "mean").item() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_oracle_gradient_is_the_closed_form(n):
    features = feature_maps(n, (2, 3, 4), torch.float64)
    got = ref.feature_flow_grad(features, 0.3, 0.7, "sum")
    for g, expected in zip(got, flow_closed_form_grads(features, 0.3, 0.7)):
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
