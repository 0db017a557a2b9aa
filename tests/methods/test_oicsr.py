"""OICSR: the out-in-channel groups (against hand-built groups on LeNet-5 and the residual ties of
a ResNet), the regularizer (a Regularizer over these coupled groups) on the oracle backend and on
the fused coupled-group path of every fused backend (values, gradients, gradcheck in float64),
the in-place path, global energy pruning with
lossless removal, and a large model on a GPU (`gpu`)."""

import pytest
import torch
from torch import nn

import fastsparse
from fastsparse import reference as ref
from fastsparse.core.groups import CoupledGroup, CoupledMember, coupled_params
from fastsparse.methods import Regularizer
from fastsparse.methods.oicsr import oicsr_groups, oicsr_regularizer, prune_lowest_energy_
from fastsparse.pruning import prune
from fastsparse.pruning.importance import channel_energy
from fastsparse.workflow.models import VGG, LeNet5, ResNetCIFAR


@pytest.fixture(params=["torch", "triton", "native"])
def path(request):
    """The penalty backend: the oracle (``"torch"``) or a fused one."""
    return request.param


class Tiny(nn.Module):
    """Conv-BN, 1x1 conv-BN with a residual conv-BN branch, linear: coupled groups with BN and
    a residual tie, in 36 parameters (gradcheck perturbs each one)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 2, 1, bias=False), nn.BatchNorm2d(2)
        self.conv3, self.bn3 = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y = y + torch.relu(self.bn3(self.conv3(y)))
        return self.fc(y.mean(dim=(2, 3)))


def small_resnet(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = ResNetCIFAR((2, 1), (4, 6)).to(device, dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
    return model, torch.randn(2, 3, 8, 8, device=device, dtype=dtype)


def tiny(dtype=torch.float32):
    torch.manual_seed(1)
    model = Tiny().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model, torch.randn(1, 1, 3, 3, dtype=dtype)


def test_groups_are_out_channel_plus_next_in_channel():
    torch.manual_seed(0)
    model, x = LeNet5(), torch.randn(1, 1, 28, 28)
    groups = oicsr_groups(model, x)
    conv1, conv2 = model.features[0], model.features[3]
    expected = sum(
        torch.sqrt(
            conv1.weight[c].square().sum() + conv1.bias[c] ** 2 + conv2.weight[:, c].square().sum()
        )
        for c in range(20)
    )
    torch.testing.assert_close(ref.coupled_penalty(groups[:1], "group_lasso"), expected)
    weights_only = oicsr_groups(model, x, bias=False)
    assert [m.name for m in weights_only[0].members] == ["features.0.weight", "features.3.weight"]


def test_groups_follow_batchnorm_and_residual_ties():
    model, x = small_resnet()
    groups = oicsr_groups(model, x)
    stem = groups[0]
    names = [m.name for m in stem.members]
    # Channel c of the stem is tied by the residual additions to every block of stage 0.
    for name in ("stem.0.weight", "stem.1.weight", "stem.1.bias", "stages.0.0.conv1.weight"):
        assert name in names
    assert "stages.0.1.bn2.weight" in names
    no_bn = oicsr_groups(model, x, batchnorm=False)
    assert all(".bn" not in m.name and "stem.1" not in m.name for g in no_bn for m in g.members)
    assert [g.num_groups for g in no_bn] == [g.num_groups for g in groups]


@pytest.mark.parametrize("kind", fastsparse.KINDS)
def test_every_kind_matches_the_oracle(kind, path):
    model, x = tiny()
    groups = oicsr_groups(model, x)
    assert [g.num_groups for g in groups] == [3, 2]
    options = {"alpha": 0.3} if kind == "sparse_group_lasso" else {}
    reg = Regularizer(None, kind, 0.5, groups=groups, backend=path, **options)
    value = reg()
    value.backward()
    alpha = options.get("alpha", 0.5)
    torch.testing.assert_close(value, 0.5 * ref.coupled_penalty(groups, kind, alpha))
    params = coupled_params(groups)
    for p, e in zip(params, ref.coupled_penalty_grad(groups, kind, alpha)):
        torch.testing.assert_close(p.grad, 0.5 * e, rtol=1e-4, atol=1e-6)


def _rebound(groups, tensors):
    """The same groups on other tensors (for gradcheck's inputs)."""
    index = {id(p): i for i, p in enumerate(coupled_params(groups))}
    return [
        CoupledGroup(
            cg.root,
            cg.num_groups,
            tuple(
                CoupledMember(m.name, tensors[index[id(m.param)]], m.dim, m.index, m.group)
                for m in cg.members
            ),
        )
        for cg in groups
    ]


@pytest.mark.parametrize("kind", ["group_lasso", "group_l1l2"])
def test_gradcheck_float64(kind, path):
    model, x = tiny(torch.float64)
    groups = oicsr_groups(model, x)
    leaves = tuple(p.detach().clone().requires_grad_(True) for p in coupled_params(groups))

    def f(*tensors):
        return Regularizer(None, kind, 1.0, groups=_rebound(groups, tensors), backend=path)()

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def test_inplace_path_equals_autograd(path):
    model, x = small_resnet()
    reg = oicsr_regularizer(model, x[:1], 0.1, "group_hoyer_square", backend=path)
    (model(x).square().mean() + reg()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    value = reg.apply_()
    torch.testing.assert_close(value, reg.strength * reg.value())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)


def test_training_with_prox_removes_channels_losslessly():
    """OICSR-GL with a group prox step drives whole out-in-channel groups to zero; prune removes
    them and the pruned model computes what the trained one does."""
    torch.manual_seed(0)
    model, x = VGG(((6,), (8,))), torch.randn(4, 3, 8, 8)
    reg = oicsr_regularizer(model, x[:1], 1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = model(x).square().mean() + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The group soft threshold at the 30% quantile of the out-in-channel norms.
    before = torch.cat(ref.coupled_group_norms(reg.groups))
    t = torch.quantile(before, 0.3).item()
    fastsparse.prox_(None, "group_lasso", t, groups=reg.groups)
    norms = ref.coupled_group_norms(reg.groups)
    dead = sum(int((n == 0).sum()) for n in norms)
    assert dead == int((before <= t).sum()) == 4  # of 14
    small = prune(model, x)
    assert sum(m.out_channels for m in small.features if hasattr(m, "out_channels")) == 14 - dead
    model.eval(), small.eval()
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_global_energy_pruning():
    model, x = small_resnet()
    groups = oicsr_groups(model, x[:1])
    energy = channel_energy(groups)
    raw = channel_energy(groups, normalize=False)
    for e, r, cg in zip(energy, raw, groups):
        torch.testing.assert_close(e * cg.group_sizes().to(e), r)
    flat = torch.cat(energy)
    k = int(0.3 * flat.numel())
    dead = prune_lowest_energy_(groups, 0.3)
    assert sum(int(d.sum()) for d in dead) == k
    picked = torch.cat([e[d] for e, d in zip(energy, dead)])
    assert picked.max() <= torch.sort(flat).values[k - 1]
    for n, d in zip(ref.coupled_group_norms(groups), dead):
        assert (n[d] == 0).all() and (n[~d] > 0).all()
    small = prune(model, x)  # verifies equal outputs on x
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_regularizer_is_over_the_oicsr_groups():
    model, x = small_resnet()
    reg = oicsr_regularizer(model, x[:1], 0.1, "group_l1l2", batchnorm=False, backend="torch")
    assert isinstance(reg, Regularizer) and reg.coupled and reg.kind == "group_l1l2"
    expected = oicsr_groups(model, x[:1], batchnorm=False)
    assert [[m.name for m in g.members] for g in reg.groups] == [
        [m.name for m in g.members] for g in expected
    ]


def test_bad_input():
    model, x = small_resnet()
    with pytest.raises(ValueError, match="no prunable out-in-channel group"):
        oicsr_regularizer(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), x[:1], 0.1)  # output only
    with pytest.raises(ValueError, match="unknown kind"):
        oicsr_regularizer(model, x[:1], 0.1, "group_l0")
    with pytest.raises(ValueError, match="strength"):
        oicsr_regularizer(model, x[:1], -1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["group_lasso", "group_l1l2"])
def test_gpu_resnet18_fused(kind):
    from fastsparse.workflow.models import resnet18_cifar

    torch.manual_seed(0)
    model = resnet18_cifar().cuda()
    reg = oicsr_regularizer(model, torch.randn(1, 3, 32, 32, device="cuda"), 1.0, kind)
    value = reg()
    value.backward()
    groups64 = _rebound(reg.groups, [p.detach().double() for p in reg.params])
    torch.testing.assert_close(
        value.double(), ref.coupled_penalty(groups64, kind), rtol=1e-5, atol=0
    )
    for p, e in zip(reg.params, ref.coupled_penalty_grad(groups64, kind)):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-4, atol=1e-6)
