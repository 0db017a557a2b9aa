"""The study interface of the sparsity methods (fastsparse.methods.build_method and the Method
of fastsparse/methods/base.py): a few training steps of each method on a small ResNet, its pruning
hook and `fastsparse.prune`."""

import pytest
import torch
from torch import nn

from fastsparse.methods import METHODS, Method, build_method
from fastsparse.pruning import prune
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
