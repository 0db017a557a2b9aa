"""The Regularizer on coupled groups: the one line of training that leads straight to `prune`."""

import pytest
import torch
from torch import nn

import fastsparse as fs
from fastsparse import reference
from fastsparse.core.groups import coupled_params


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
    )  # fmt: skip


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_coupled_is_traced_and_matches_the_oracle():
    model = _model()
    reg = fs.Regularizer(model, "group_lasso", 0.1, groups="coupled", example_inputs=X)
    groups = fs.coupled_groups(model, X)
    assert reg.coupled and len(reg.groups) == len(groups)
    torch.testing.assert_close(reg.value(), reference.coupled_penalty(groups, "group_lasso"))
    reg.apply_()
    expected = reference.coupled_penalty_grad(groups, "group_lasso")
    for p, g in zip(coupled_params(groups), expected):
        torch.testing.assert_close(p.grad, 0.1 * g)


def test_given_coupled_groups_and_no_model():
    model = _model()
    groups = fs.coupled_groups(model, X)
    reg = fs.Regularizer(None, "group_lasso", 1.0, groups=groups)
    (reg()).backward()
    assert model[0].weight.grad is not None


def test_training_with_it_then_threshold_then_prune_shrinks_the_model():
    model = _model()
    reg = fs.Regularizer(model, "group_lasso", 0.2, groups="coupled", example_inputs=X)
    start = float(reg.value())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(opt)
    for _ in range(30):
        opt.zero_grad()
        model(X).square().mean().backward()
        opt.step()
    assert float(reg.value()) < start  # the penalty's gradient reached every step
    zeroed = fs.threshold_(model, X, 0.9)  # filters below 90% of their layer's strongest
    assert sum(int(dead.sum()) for dead in zeroed.values()) > 0
    small = fs.prune(model.eval(), X)
    assert small[0].out_channels == int((~zeroed["0"]).sum())
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((None, "l1", 1.0), {}, "may only be None with coupled groups"),
        ((_model(), "l1", 1.0), {"groups": "coupled"}, "give the model and example_inputs"),
        ((_model(), "l3", 1.0), {"groups": "coupled", "example_inputs": X}, "unknown kind"),
    ],
)
def test_clear_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fs.Regularizer(*args, **kwargs)


def test_groups_of_another_model_are_refused():
    groups = fs.coupled_groups(_model(), X)
    with pytest.raises(ValueError, match="not among `tensors`"):
        fs.Regularizer(_model(), "group_lasso", 1.0, groups=groups)
