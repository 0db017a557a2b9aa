"""The numerical contract: the gradient table dR/dw = a_g sign(w) + b_g w, written out
independently in tests/helpers.py (contract_coefficients), equals autograd of the oracle for every
kind and grouping."""

import pytest
import torch

import fastsparse as fs
from fastsparse import reference as ref
from fastsparse.core.contract import as_groupings
from tests.helpers import GROUPINGS, contract_coefficients, grouping_id, make, shapes_for, ungroup


@pytest.mark.parametrize("groups", GROUPINGS, ids=grouping_id)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_contract_table_equals_autograd_of_the_oracle(kind, groups):
    for shape in shapes_for(groups):
        w = make([shape], torch.float64, "cpu", seed=9)[0]
        expected = ref.penalty_grad(w, kind, groups, 0.3)[0]
        total = torch.zeros_like(w)
        for grouping in as_groupings(groups):
            a, b = contract_coefficients(w, kind, grouping, 0.3)
            view = ref.grouped_view(w, grouping)
            total += ungroup(a[:, None] * view.sign() + b[:, None] * view, w, grouping)
        torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
