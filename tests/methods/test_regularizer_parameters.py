"""Which tensors a Regularizer penalizes: frozen, tied and parametrized weights; AMP; scalars."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import fastsparse as fs
from fastsparse import reference


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())


def test_frozen_weights_are_left_out_and_do_not_move():
    model = _net()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    reg = fs.Regularizer(model, "group_lasso", 1.0, include_output=True)
    assert reg.params == [model[2].weight]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.attach(optimizer)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    assert model[0].weight.grad is None
    assert torch.equal(model[0].weight, frozen)


def test_everything_frozen_is_an_error_at_construction():
    model = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="all frozen"):
        fs.Regularizer(model, "group_lasso", 1.0, include_output=True)


def test_tied_weights_count_once():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    reg = fs.Regularizer(model, "group_lasso", 1.0)
    assert len(reg.params) == 1
    expected = reference.penalty([shared.weight], "group_lasso")
    torch.testing.assert_close(reg.value(), expected)
    reg.apply_()  # no "same tensor" error at the first step
    torch.testing.assert_close(
        shared.weight.grad, reference.penalty_grad([shared.weight], "group_lasso")[0]
    )


def test_parametrized_weight_is_recomputed_every_call():
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.ReLU(), nn.Linear(4, 2))
    reg = fs.Regularizer(model, "group_lasso", 0.1, include_output=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # the autograd path used to fail at the second backward
        optimizer.zero_grad()
        (model(torch.randn(3, 5)).sum() + reg()).backward()
        optimizer.step()
        current = [model[0].weight, model[2].weight]
        torch.testing.assert_close(reg.value(), reference.penalty(current, "group_lasso"))


class _Scale(nn.Module):
    def forward(self, w):
        return 2.0 * w


def test_inplace_path_on_parametrized_weights_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(5, 4)), nn.Linear(4, 2))
    parametrize.register_parametrization(model[1], "weight", _Scale())
    reg = fs.Regularizer(model, "group_lasso", 0.1, include_output=True)
    reg().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(expected) == 3  # weight_norm's two leaves and the scaled weight's original
    model.zero_grad(set_to_none=True)
    reg.apply_()
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g)


def test_a_computed_tensor_in_a_parameter_list_is_refused():
    model = weight_norm(nn.Linear(5, 4))
    with pytest.raises(ValueError, match="pass the model"):
        fs.Regularizer([model.weight], "group_lasso", 0.1)


@pytest.mark.parametrize("strength", [np.float32(1e-3), np.float64(1e-3), torch.tensor(1e-3)])
def test_real_scalar_strengths(strength):
    reg = fs.Regularizer(_net(), "l1", strength)
    assert reg.strength == pytest.approx(1e-3)


@pytest.mark.parametrize("bad", [torch.ones(2), "1e-3", True, float("nan"), -1.0, float("inf")])
def test_bad_strengths(bad):
    with pytest.raises((TypeError, ValueError)):
        fs.Regularizer(_net(), "l1", bad)


def test_apply_with_a_grad_scaler_adds_the_scaled_penalty_gradient():
    class FakeScaler:  # the scale a GradScaler's gradients carry before scaler.step()
        def get_scale(self):
            return 1024.0

    model = _net()
    reg = fs.Regularizer(model, "group_lasso", 1e-2)
    reg.apply_()
    plain = [p.grad.clone() for p in reg.params]
    model.zero_grad(set_to_none=True)
    reg.apply_(FakeScaler())
    for p, g in zip(reg.params, plain):
        torch.testing.assert_close(p.grad, 1024.0 * g)


def test_the_output_layer_is_left_out_by_default():
    vision = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 10))
    assert fs.Regularizer(vision, "group_lasso", 1.0).params == [vision[0].weight]
    single = nn.Linear(5, 3)  # one layer: the layer asked for
    assert fs.Regularizer(single, "group_lasso", 1.0).params == [single.weight]

    class TiedLM(nn.Module):  # the transformers convention: get_output_embeddings()
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.mlp = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.embed.weight
            self.norm_out = nn.Linear(20, 20)  # a last layer after the head

        def get_output_embeddings(self):
            return self.lm_head

    lm = TiedLM()
    assert fs.Regularizer(lm, "group_lasso", 1.0).params == [lm.mlp.weight]


def test_non_finite_weights_give_a_non_finite_value():
    model = _net()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("inf")
    assert not torch.isfinite(fs.Regularizer(model, "group_lasso", 1.0).value())
