"""The Regularizer (fastsparse.methods.regularizer): its autograd and in-place paths agree, attach
applies the penalty gradient before each optimizer step, and bad settings fail up front."""

import pytest
import torch

import fastsparse as fs
from fastsparse import reference as ref


def test_regularizer_paths_agree(device, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)
    ).to(device)
    assert fs.Regularizer(model, "l1l2", 1e-2).params == [model[0].weight]  # not the classifier
    reg = fs.Regularizer(model, "l1l2", 1e-2, backend=backend, include_output=True)
    assert [p.shape for p in reg.params] == [model[0].weight.shape, model[3].weight.shape]
    x = torch.randn(2, 1, 6, 6, device=device)

    model.zero_grad()
    (model(x).sum() + reg()).backward()
    autograd_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    model(x).sum().backward()
    term = reg.apply_()
    torch.testing.assert_close(term, reg())
    for p, g in zip(model.parameters(), autograd_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_regularizer_attach_applies_before_each_step(device, backend):
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 3).to(device)
    start = model.weight.detach().clone()
    reg = fs.Regularizer(model, "group_lasso", 0.5, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = reg.attach(opt)
    model.zero_grad()
    model(torch.zeros(1, 5, device=device)).sum().backward()  # weight grad is exactly 0
    opt.step()
    expected = start - 0.1 * 0.5 * ref.penalty_grad(start, "group_lasso")[0]
    torch.testing.assert_close(model.weight.detach(), expected)
    handle.remove()
    before = model.weight.detach().clone()
    model.zero_grad()
    model(torch.zeros(1, 5, device=device)).sum().backward()
    opt.step()
    assert torch.equal(model.weight.detach(), before)


def test_regularizer_validates_up_front():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="unknown kind"):
        fs.Regularizer(model, "l3", 1.0)
    with pytest.raises(ValueError, match="strength"):
        fs.Regularizer(model, "l1", -1.0)
    with pytest.raises(ValueError, match="no parameters"):
        fs.Regularizer(torch.nn.ReLU(), "l1", 1.0)
