"""Selective weight decay, the method: the regularizer object (attach, refresh) against the same
steps by hand with the oracle, the study entry point, and the iterative pruning schedule."""

import pytest
import torch
from torch import nn

from fastsparse import reference as ref
from fastsparse.methods.selective_decay import (
    IterativePruning,
    SelectiveWeightDecay,
    selective_decay_regularizer,
)

# ------------------------------------------------------------------------------------------------
# The regularizer object
# ------------------------------------------------------------------------------------------------


def test_regularizer_attach_and_refresh(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)
    twin = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 6, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = SelectiveWeightDecay(model, 0.2, quantile=0.5, refresh=2, backend="triton")
    reg.attach(opt)
    for step in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        # The same step by hand with the oracle.
        twin(x).square().mean().backward()
        ws = [twin[0].weight, twin[2].weight]
        if step % 2 == 0:
            taus = ref.relevance_thresholds([w.detach() for w in ws], [w.grad for w in ws], 0.5)
        new, _ = ref.selective_decay_grad([w.detach() for w in ws], [w.grad for w in ws], taus, 0.2)
        with torch.no_grad():
            for w, g in zip(ws, new):
                w.grad.copy_(g)
            for p in twin.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert reg.steps == 3 and int(reg.last_count) == (30 + 15) // 2


def test_entry_point():
    """selective_decay_regularizer: a SelectiveWeightDecay of the Conv and Linear weights (not
    the biases) with the given options, whose step is the oracle's update."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    reg = selective_decay_regularizer(conv, 1e-3, quantile=0.3, backend="torch")
    assert isinstance(reg, SelectiveWeightDecay)
    assert len(reg.params) == 1 and reg.params[0] is conv.weight
    assert (reg.strength, reg.quantile, reg.threshold) == (1e-3, 0.3, None)
    assert (reg.relevance, reg.scope, reg.keep_loss_grad, reg.refresh) == (
        "taylor",
        "global",
        True,
        1,
    )
    conv(torch.randn(2, 3, 5, 5)).square().mean().backward()
    w, g, bias_grad = conv.weight.detach().clone(), conv.weight.grad.clone(), conv.bias.grad.clone()
    taus = ref.relevance_thresholds([w], [g], 0.3)
    (expected,), (mask,) = ref.selective_decay_grad([w], [g], taus, 1e-3)
    count = reg.apply_()
    assert int(count) == int(mask.sum()) == int(0.3 * w.numel())
    torch.testing.assert_close(conv.weight.grad, expected)
    assert not torch.equal(conv.weight.grad, g)  # the irrelevant weights got the decay term
    assert torch.equal(conv.weight.grad[~mask], g[~mask])  # the relevant ones did not
    assert torch.equal(conv.bias.grad, bias_grad)
    assert torch.equal(conv.weight.detach(), w)  # a gradient step only


# ------------------------------------------------------------------------------------------------
# Iterative pruning
# ------------------------------------------------------------------------------------------------


def test_iterative_pruning_schedule_and_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    pruner = IterativePruning(model, 0.6, rounds=3, interval=2, start=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(opt)
    pruned_at = []
    for epoch in range(8):
        model(torch.randn(4, 10)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if pruner.step():
            pruned_at.append((epoch, round(pruner.sparsity(), 3)))
        for p, m in zip(pruner.params, pruner.masks):
            assert not p[~m].any()  # pruned weights stay exactly zero
    assert pruned_at == [(1, 0.2), (3, 0.4), (5, 0.6)]
    assert pruner.done
    # Magnitude: every pruned weight was the smallest at its round; the survivors are nonzero.
    assert all(p[m].abs().min() > 0 for p, m in zip(pruner.params, pruner.masks))


def test_iterative_pruning_cubic_tensor_scope_and_state():
    pruner = IterativePruning(
        [torch.randn(50), torch.randn(30)], 0.5, rounds=2, schedule="cubic", scope="tensor"
    )
    assert pruner.target(1) == pytest.approx(0.5 * (1 - 0.5**3))
    pruner.step()
    assert [int((~m).sum()) for m in pruner.masks] == [21, 13]
    state = pruner.state_dict()
    other = IterativePruning([torch.randn(50), torch.randn(30)], 0.5, rounds=2)
    other.load_state_dict(state)
    assert other.round == 1 and all(torch.equal(a, b) for a, b in zip(other.masks, pruner.masks))


def test_iterative_pruning_undoes_a_round_that_hurts():
    w = torch.arange(1.0, 11.0)
    pruner = IterativePruning([w], 0.6, rounds=3, tolerance=0.05)
    assert pruner.step(metric=0.90)  # round 1: 2 weights
    assert pruner.step(metric=0.90)  # round 2: 4 weights
    assert not pruner.step(metric=0.80)  # worse than 0.90 - 0.05: undo round 2, stop
    assert pruner.done and pruner.round == 1
    assert w.tolist() == [0.0, 0.0] + [float(v) for v in range(3, 11)]
    assert not pruner.step(metric=0.99)


def test_bad_input():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="final_sparsity"):
        IterativePruning([p], 1.0)
    with pytest.raises(ValueError, match="schedule"):
        IterativePruning([p], 0.5, schedule="exp")
