"""The selective weight decay oracle (fastsparse.reference.selective_decay): the rule by hand, the
quantile threshold, and the relevance thresholds' scopes."""

import torch

from fastsparse import reference as ref


def test_oracle_rule_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    g = torch.tensor([0.1, 1.0, -0.1, 0.0])  # relevances 0.1, 2, 0.3, 0
    new, (mask,) = ref.selective_decay_grad([w], [g], torch.tensor([0.3]), 0.5)
    assert mask.tolist() == [True, False, True, True]
    torch.testing.assert_close(new[0], torch.tensor([0.6, 1.0, 1.4, 0.25]))
    new, _ = ref.selective_decay_grad([w], [g], torch.tensor([0.3]), 0.5, keep_loss_grad=False)
    torch.testing.assert_close(new[0], torch.tensor([0.5, 1.0, 1.5, 0.25]))
    new, (mask,) = ref.selective_decay_grad([w], [g], torch.tensor([1.0]), 0.5, "magnitude")
    assert mask.tolist() == [True, False, False, True]


def test_quantile_threshold_selects_exactly_k():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.1, 0.37, 0.5, 1.0):
        tau = ref.quantile_threshold(scores, q)
        assert int((scores <= tau).sum()) == int(q * 1000 + 1e-9)


def test_thresholds_leave_zero_weights_out_and_scopes():
    w = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    g = torch.ones(6)
    (tau,) = ref.relevance_thresholds([w], [g], 0.5)  # of the 4 nonzero: 1, 2
    assert tau.item() == 2.0
    w2 = torch.tensor([10.0, 20.0])
    taus = ref.relevance_thresholds([w, w2], [g, torch.ones(2)], 0.5, scope="tensor")
    assert taus.tolist() == [2.0, 10.0]
    taus = ref.relevance_thresholds([w, w2], [g, torch.ones(2)], 0.5, scope="global")
    assert taus.tolist() == [3.0, 3.0]
