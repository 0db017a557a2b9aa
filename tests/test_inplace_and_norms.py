"""The in-place gradient path, group norms and the Regularizer, against the oracle."""

import pytest
import torch
from helpers import GROUPINGS, grouping_id, shapes_for
from test_penalty import make

import fastsparse as fs
from fastsparse import reference as ref


@pytest.mark.parametrize("groups", GROUPINGS, ids=grouping_id)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_inplace_equals_autograd(kind, groups, device, nan_outputs, backend):
    tensors = make(shapes_for(groups), torch.float32, device, seed=11)
    existing = [torch.randn_like(t) for t in tensors]
    params = [t.clone().requires_grad_(True) for t in tensors]
    for p, g in zip(params, existing):
        p.grad = g.clone()
    value = fs.add_penalty_grad_(params, kind, 0.25, groups=groups, backend=backend)

    leaves = [t.clone().requires_grad_(True) for t in tensors]
    fs.penalty(leaves, kind, groups=groups, backend=backend).backward()
    torch.testing.assert_close(value, ref.penalty(tensors, kind, groups))
    for p, g, leaf in zip(params, existing, leaves):
        torch.testing.assert_close(p.grad, g + 0.25 * leaf.grad, rtol=1e-5, atol=1e-6)


def test_inplace_allocates_missing_grads_and_keeps_weights(device, backend):
    tensors = make([(5, 3, 3, 3), (5,)], torch.float32, device)
    params = [t.clone().requires_grad_(True) for t in tensors]
    fs.add_penalty_grad_(params, "group_lasso", 1e-2, backend=backend)
    expected = ref.penalty_grad(tensors, "group_lasso")
    for p, t, e in zip(params, tensors, expected):
        assert torch.equal(p.detach(), t)
        torch.testing.assert_close(p.grad, 1e-2 * e)


def test_inplace_low_precision_weights_fp32_grads(device, backend):
    w = make([(8, 4, 3, 3)], torch.bfloat16, device)[0].requires_grad_(True)
    if hasattr(w, "grad_dtype"):  # torch >= 2.10 checks .grad's dtype unless told otherwise
        w.grad_dtype = torch.float32
    w.grad = torch.zeros(w.shape, dtype=torch.float32, device=device)
    fs.add_penalty_grad_(w, "l1l2", 0.5, backend=backend)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, 0.5 * ref.penalty_grad(w.detach().float(), "l1l2")[0])


@pytest.mark.parametrize(
    "groups", ["filters", "channels", ("filters", "channels")], ids=grouping_id
)
def test_inplace_channels_last_and_mismatched_grad_layout(groups, device, backend):
    w = make([(6, 4, 3, 3)], torch.float32, device)[0]
    param = w.to(memory_format=torch.channels_last).requires_grad_(True)
    param.grad = torch.ones(w.shape, device=device)  # contiguous grad, channels_last weight
    fs.add_penalty_grad_(param, "hoyer_square", 0.1, groups=groups, backend=backend)
    expected = 1 + 0.1 * ref.penalty_grad(w, "hoyer_square", groups)[0]
    torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)


def test_inplace_split_path_and_fp64_strength(device, backend):
    tensors = make([(2, 20000), (3, 3)], torch.float64, device)
    params = [t.clone().requires_grad_(True) for t in tensors]
    fs.add_penalty_grad_(params, "l1l2", 1e-3, backend=backend)
    for p, e in zip(params, ref.penalty_grad(tensors, "l1l2")):
        torch.testing.assert_close(p.grad, 1e-3 * e, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("grouping", ["filters", "channels", "kernels", None], ids=grouping_id)
def test_group_norms_match_oracle(grouping, device, backend):
    tensors = make(shapes_for(grouping), torch.float32, device, seed=12)
    norms = fs.group_norms(tensors, groups=grouping, backend=backend)
    expected = ref.group_norms(tensors, grouping)
    assert len(norms) == len(tensors)
    for n, e in zip(norms, expected):
        assert n.dim() == 1
        torch.testing.assert_close(n, e)


def test_group_norms_empty_and_torch_backend(backend):
    norms = fs.group_norms([torch.empty(4, 0), torch.randn(3, 2)], backend="torch")
    assert norms[0].shape == (4,) and (norms[0] == 0).all()
    assert norms[1].shape == (3,)


def test_regularizer_paths_agree(device, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)
    ).to(device)
    reg = fs.Regularizer(model, "l1l2", 1e-2, backend=backend)
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
