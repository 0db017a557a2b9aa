"""Network slimming: the l1 regularizer on BatchNorm scales through the fused engine (every fused
backend, gradcheck in float64), the prox step, channel scores with residual ties, and slimming +
`fastsparse.prune` removing channels losslessly on a small VGG and ResNet; a large VGG on a GPU."""

import pytest
import torch
from torch import nn

from fastsparse import reference as ref
from fastsparse.methods.regularizer import Regularizer
from fastsparse.methods.slimming import (
    bn_scales,
    channel_scales,
    prox_bn_scales_,
    slim_,
    slimming_regularizer,
)
from fastsparse.pruning import coupled_groups, prune
from fastsparse.workflow.models import VGG, ResNetCIFAR


def randomize_bn(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model


def small_vgg():
    torch.manual_seed(0)
    return randomize_bn(VGG(((6,), (8, 8)))), torch.randn(2, 3, 8, 8)


def small_resnet():
    torch.manual_seed(0)
    return randomize_bn(ResNetCIFAR((2, 1), (4, 6))), torch.randn(2, 3, 8, 8)


def test_regularizer_is_l1_on_bn_scales(device, backend):
    model, _ = small_vgg()
    model = model.to(device)
    reg = slimming_regularizer(model, 0.3, backend=backend)
    assert isinstance(reg, Regularizer) and reg.params == bn_scales(model)
    value = reg()
    value.backward()
    expected = 0.3 * sum(
        m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    )
    torch.testing.assert_close(value, expected)
    for gamma in bn_scales(model):
        torch.testing.assert_close(gamma.grad, 0.3 * gamma.detach().sign())


def test_inplace_path(device, backend):
    model, x = small_vgg()
    model = model.to(device)
    reg = slimming_regularizer(model, 0.1, backend=backend)
    model(x.to(device)).sum().backward()
    before = [g.grad.clone() for g in bn_scales(model)]
    reg.apply_()
    for gamma, b in zip(bn_scales(model), before):
        torch.testing.assert_close(gamma.grad, b + 0.1 * gamma.detach().sign())


def test_gradcheck_float64(device, backend):
    gen = torch.Generator().manual_seed(1)
    # l1 is smooth away from 0: scales bounded away from it.
    scales = [
        (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
        * torch.tensor([1.0, -1.0]).repeat(n)[:n]
        for n in (3, 5)
    ]
    scales = tuple(s.to(device).requires_grad_(True) for s in scales)
    reg = Regularizer(list(scales), "l1", 0.7, groups="filters", backend=backend)

    def f(*ss):
        reg.params = list(ss)
        return reg()

    assert torch.autograd.gradcheck(f, scales)


def test_prox_zeroes_small_scales():
    model, _ = small_vgg()
    scales = [g.detach().clone() for g in bn_scales(model)]
    masks = prox_bn_scales_(model, 0.5, backend="torch")
    for gamma, s, m in zip(bn_scales(model), scales, masks):
        expected = torch.sign(s) * torch.clamp(s.abs() - 0.5, min=0)
        torch.testing.assert_close(gamma.detach(), expected)
        assert torch.equal(m, expected != 0)


def test_channel_scales_take_the_largest_tied_scale():
    model, x = small_resnet()
    groups = coupled_groups(model, x[:1])
    scores = channel_scales(groups)
    stem = groups[0]  # tied through the residual stream to bn2 of every block of stage 0
    tied = [model.stem[1].weight] + [b.bn2.weight for b in model.stages[0]]
    expected = torch.stack([t.detach().abs() for t in tied]).max(dim=0).values.double()
    assert stem.root == "stem.0"
    torch.testing.assert_close(scores[0], expected)
    block = next(i for i, g in enumerate(groups) if g.root == "stages.0.0.conv1")
    torch.testing.assert_close(scores[block], model.stages[0][0].bn1.weight.detach().abs().double())


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_slim_then_prune_is_lossless(arch):
    model, x = small_vgg() if arch == "vgg" else small_resnet()
    groups = coupled_groups(model, x[:1])
    scores = channel_scales(groups)
    result = slim_(model, groups=groups, ratio=0.4)
    n = sum(s.numel() for s in scores if s is not None)
    assert result.scored == n and result.channels == int(0.4 * n)
    # The zeroed channels are those of smallest score, and their whole groups are zero.
    chosen = torch.cat([s[d] for s, d in zip(scores, result.dead) if s is not None])
    kept = torch.cat([s[~d] for s, d in zip(scores, result.dead) if s is not None])
    assert chosen.max() <= kept.min()
    for norms, dead in zip(ref.coupled_group_norms(groups), result.dead):
        if dead.numel():
            assert (norms[dead] == 0).all()
    small = prune(model, x)
    removed = sum(
        a.out_channels - b.out_channels
        for a, b in zip(model.modules(), small.modules())
        if isinstance(a, nn.Conv2d)
    )
    assert removed >= result.channels  # residual ties remove a channel from several convs
    model.eval(), small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    params = sum(p.numel() for p in small.parameters())
    assert params < sum(p.numel() for p in model.parameters())


def test_slim_by_threshold():
    model, x = small_vgg()
    expected = sum(int((g.abs() <= 0.5).sum()) for g in bn_scales(model))
    result = slim_(model, x[:1], threshold=0.5)
    assert result.channels == expected > 0 and result.scored == 6 + 8 + 8
    with pytest.raises(ValueError, match="exactly one"):
        slim_(model, x[:1])
    with pytest.raises(ValueError, match="example_inputs"):
        slim_(model, ratio=0.1)
    with pytest.raises(ValueError, match="no affine BatchNorm"):
        slimming_regularizer(nn.Linear(2, 2), 1e-4)


@pytest.mark.gpu
def test_gpu_vgg16_regularizer():
    from fastsparse.workflow.models import vgg16_bn

    model = randomize_bn(vgg16_bn()).cuda()
    for backend in ("triton", "native"):
        reg = slimming_regularizer(model, 1e-4, backend=backend)
        model.zero_grad()
        value = reg()
        value.backward()
        scales = bn_scales(model)
        expected = 1e-4 * sum(g.detach().double().abs().sum() for g in scales)
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=0)
        for g in scales:
            torch.testing.assert_close(g.grad, 1e-4 * g.detach().sign())
