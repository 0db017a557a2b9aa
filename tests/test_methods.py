"""The study interface of the issue-8 methods (fastsparse.methods.build_method): a few training
steps of each method on a small ResNet, its pruning hook and `fastsparse.prune`; and the channel
selection helpers they share (fastsparse.pruning.importance)."""

import pytest
import torch
from torch import nn

from fastsparse.methods import METHODS, Method, build_method
from fastsparse.pruning import prune
from fastsparse.pruning.importance import select_channels, zero_channels_
from fastsparse.reference import CoupledGroup, CoupledMember
from fastsparse.workflow.models import ResNetCIFAR

OPTIONS = {
    "oicsr": {"kind": "group_lasso"},
    "feature_flow": {"curvature_weight": 0.5},
    "selective_decay": {"quantile": 0.5, "final_sparsity": 0.5, "rounds": 2},
    "slimming": {"ratio": 0.25},
}


@pytest.mark.parametrize("name", METHODS)
def test_training_loop_and_prune(name):
    torch.manual_seed(0)
    model, x = ResNetCIFAR((2, 1), (4, 6)), torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    method = build_method(name, model, x[:1], 1e-2, backend="torch", **OPTIONS[name])
    assert isinstance(method, Method) and method.name == name
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    method.attach(opt)
    for _epoch in range(2):
        for _ in range(2):
            loss = nn.functional.cross_entropy(model(x), y) + method.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
        method.end_epoch(metric=0.5)
    if name == "selective_decay":
        assert method.pruner.done and method.pruner.sparsity() == pytest.approx(0.5, abs=1e-3)
        for p, m in zip(method.pruner.params, method.pruner.masks):
            assert not p[~m].any()
    method.before_prune(threshold=0.0)
    small = prune(model, x[:1])
    if name == "slimming":
        assert sum(p.numel() for p in small.parameters()) < sum(
            p.numel() for p in model.parameters()
        )
    method.close()
    assert all(not m._forward_hooks for m in model.modules())


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("ssl", nn.Linear(2, 2), torch.randn(1, 2), 1e-3)


def test_select_channels_ratio_threshold_and_ties():
    scores = [torch.tensor([0.5, 0.1, 0.9]), None, torch.tensor([0.1, 0.7])]
    dead = select_channels(scores, ratio=0.4)  # 2 of 5; tie at 0.1 broken by order
    assert [d.tolist() for d in dead] == [[False, True, False], [], [True, False]]
    dead = select_channels(scores, threshold=0.5)
    assert [d.tolist() for d in dead] == [[True, True, False], [], [True, False]]
    assert [d.tolist() for d in select_channels(scores, ratio=0.0)][0] == [False] * 3
    with pytest.raises(ValueError, match="exactly one"):
        select_channels(scores)
    with pytest.raises(ValueError, match="ratio"):
        select_channels(scores, ratio=2.0)


def test_zero_channels_touches_every_member_slice():
    a, b = torch.ones(4, 3), torch.ones(2, 4, 5)
    members = (
        CoupledMember("a", a, 0, torch.arange(4), torch.arange(4)),
        CoupledMember("b", b, 1, torch.arange(4), torch.tensor([0, 1, 2, 3])),
    )
    group = CoupledGroup("a", 4, members)
    assert zero_channels_([group], [torch.tensor([False, True, False, True])]) == 2
    assert a.sum(dim=1).tolist() == [3.0, 0.0, 3.0, 0.0]
    assert b.sum(dim=(0, 2)).tolist() == [10.0, 0.0, 10.0, 0.0]
    with pytest.raises(ValueError, match="masks"):
        zero_channels_([group], [])
