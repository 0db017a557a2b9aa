"""Fused prox steps and coupled groups on every fused backend, against the oracle."""

import pytest
import torch
from helpers import gradient_scale, grouping_id, shapes_for
from test_penalty import make

import fastsparse as fs
from fastsparse import reference as ref
from fastsparse.functional.prox import prox_
from fastsparse.pruning import coupled_groups
from fastsparse.workflow.models import ResNetCIFAR

PROX_CASES = [
    ("l1", 0.5),
    ("l0", 0.5),
    ("group_lasso", 1.5),
    ("group_l0", 2.0),
    ("l0_group_lasso", (0.4, 1.0)),
]


@pytest.mark.parametrize("kind,threshold", PROX_CASES, ids=[k for k, _ in PROX_CASES])
@pytest.mark.parametrize("grouping", ["filters", "channels", "kernels", None], ids=grouping_id)
def test_fused_prox_matches_oracle(kind, threshold, grouping, backend, device):
    shapes = shapes_for(grouping) + ([(3, 20000)] if grouping != "kernels" else [])
    tensors = make(shapes, torch.float32, device, seed=31)
    fused = [t.clone() for t in tensors]
    expected = [t.clone() for t in tensors]
    masks = prox_(fused, kind, threshold, groups=grouping, backend=backend)
    expected_masks = ref.prox_(expected, kind, threshold, grouping)
    for f, e, m, em in zip(fused, expected, masks, expected_masks):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)
        assert torch.equal(m.cpu(), em.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_fused_prox_dtypes_and_layouts(dtype, backend, device):
    base = make([(6, 4, 3, 3)], dtype, device, seed=32)[0]
    for layout in (
        lambda t: t,
        lambda t: t.to(memory_format=torch.channels_last),
        lambda t: t.transpose(0, 1),
    ):
        w, expected = layout(base.clone()), layout(base.clone())
        prox_(w, "group_lasso", 1.0, groups="filters", backend=backend)
        ref.prox_([expected], "group_lasso", 1.0, "filters")
        torch.testing.assert_close(
            w,
            expected,
            rtol=1e-2 if dtype == torch.bfloat16 else 1e-12,
            atol=1e-2 if dtype == torch.bfloat16 else 1e-12,
        )


class TinyConvNet(torch.nn.Module):
    """LeNet's structure (conv, BN, conv, flatten into a linear layer) at interpreter size."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 3, 3)
        self.bn1 = torch.nn.BatchNorm2d(3)
        self.conv2 = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def _models():
    torch.manual_seed(0)
    tiny = TinyConvNet()
    with torch.no_grad():  # BN scales and shifts of a trained net, not all ones and zeros
        tiny.bn1.weight.uniform_(0.5, 1.5)
        tiny.bn1.bias.uniform_(-0.5, 0.5)
    resnet = ResNetCIFAR((1, 1, 1, 1), (4, 8, 8, 16), num_classes=5, in_channels=3)
    return [(tiny, torch.randn(2, 1, 6, 6)), (resnet, torch.randn(2, 3, 16, 16))]


@pytest.mark.parametrize("kind", ["group_lasso", "l1l2", "group_l1l2", "hoyer_square"])
def test_coupled_penalty_value_grad_and_norms(kind, backend, device):
    for model, x in _models():
        model = model.to(device)
        groups = coupled_groups(model, x.to(device))
        params = reference_params = ref.coupled_params(groups)
        value = fs.penalty(None, kind, groups=groups, backend=backend)
        grads = torch.autograd.grad(value, params)
        expected = ref.coupled_penalty(groups, kind)
        expected_grads = ref.coupled_penalty_grad(groups, kind)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        # Norm-wise: errors relative to the largest gradient entry (terms cancel elementwise).
        atol = 1e-6 * gradient_scale(expected_grads)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=atol)
        norms = fs.group_norms(None, groups=groups, backend=backend)
        for n, e in zip(norms, ref.coupled_group_norms(groups)):
            torch.testing.assert_close(n, e, rtol=1e-5, atol=1e-6)
        for p in reference_params:
            p.grad = torch.ones_like(p)
        fs.add_penalty_grad_(model, kind, 0.5, groups=groups, backend=backend)
        for p, e in zip(reference_params, expected_grads):
            torch.testing.assert_close(p.grad, 1 + 0.5 * e, rtol=1e-4, atol=atol)


def test_coupled_gradcheck_float64(backend, device):
    model, x = _models()[0]
    model = model.double().to(device)
    groups = coupled_groups(model, x.double().to(device))
    params = ref.coupled_params(groups)

    def f(*_params):  # the groups hold the model's parameters: gradcheck perturbs them in place
        return fs.penalty(None, "l1l2", groups=groups, backend=backend)

    # Perturbing every weight costs two interpreted penalties each: the small tensors (conv1,
    # BN, biases) cover every member kind; the big ones are checked against the oracle above.
    small = tuple(p for p in params if p.numel() <= 30)
    assert len(small) >= 5
    assert torch.autograd.gradcheck(f, small, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["group_lasso", "group_l0"])
def test_coupled_prox_zeroes_whole_groups_and_prune_removes_them(kind, backend, device):
    model, x = _models()[1]
    model = model.to(device).eval()
    x = x.to(device)
    groups = coupled_groups(model, x)
    expected_model = _clone(model)
    expected_groups = coupled_groups(expected_model, x)
    threshold = torch.quantile(torch.cat(ref.coupled_group_norms(groups)), 0.4).item()
    masks = prox_(None, kind, threshold, groups=groups, backend=backend)
    expected_masks = ref.prox_(None, kind, threshold, expected_groups)
    for m, e in zip(masks, expected_masks):
        assert torch.equal(m.cpu(), e.cpu())
    for p, e in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-6)
    dead = sum(int((~m).sum()) for m in masks)
    assert dead > 0
    pruned = fs.prune(model, x, threshold=0.0)
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def _clone(model):
    import copy

    return copy.deepcopy(model)
