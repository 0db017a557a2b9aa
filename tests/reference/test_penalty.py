"""The oracle's coupled groups (fastsparse.reference.penalty): statistics, norms, the coupled
matrix and the penalty with its gradient, against each group's elements gathered by hand."""

import pytest
import torch

import fastsparse.reference as ref
from fastsparse.core.contract import KINDS
from fastsparse.core.groups import CoupledGroup, CoupledMember
from tests.helpers import explicit_rows, overlapping_groups


def test_coupled_stats_and_norms_sum_member_slices():
    groups, _ = overlapping_groups()
    for cg, rows in zip(groups, explicit_rows(groups)):
        s1, s2 = ref.coupled_group_stats(cg)
        torch.testing.assert_close(s1, torch.stack([r.abs().sum() for r in rows]))
        torch.testing.assert_close(s2, torch.stack([r.square().sum() for r in rows]))
    norms = ref.coupled_group_norms(groups)
    assert [n.shape[0] for n in norms] == [3, 2]
    assert groups[0].group_sizes().tolist() == [4 + 1 + 2] * 3


def test_coupled_matrix_handles_uneven_groups():
    """A flatten maps one channel to several columns; group sizes may even differ."""
    w = torch.arange(12.0).reshape(2, 6)
    member = CoupledMember("fc.weight", w, 1, torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 2]))
    matrix = ref.coupled_matrix(CoupledGroup("conv", 3, (member,)))
    assert matrix.shape == (3, 6)
    s1, _ = ref.coupled_group_stats(CoupledGroup("conv", 3, (member,)))
    assert s1.tolist() == [0 + 1 + 2 + 6 + 7 + 8, 3 + 4 + 9 + 10, 5 + 11]


@pytest.mark.parametrize("kind", KINDS)
def test_coupled_penalty_and_grad(kind):
    groups, params = overlapping_groups()
    expected = sum(
        ref.tensor_penalty(
            torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), kind, "filters", 0.5
        )
        for rows in explicit_rows(groups)
    )
    torch.testing.assert_close(ref.coupled_penalty(groups, kind), expected)
    grads = ref.coupled_penalty_grad(groups, kind)
    assert [g.shape for g in grads] == [p.shape for p in params]
    leaves = [p.detach().requires_grad_(True) for p in params]
    mapping = {id(p): leaf for p, leaf in zip(params, leaves)}
    torch.autograd.gradcheck(
        lambda *_: ref.coupled_penalty(ref.rebind(groups, mapping), kind), leaves
    )
