"""Parametrized layers cannot be pruned in place: a PruningError names the layer."""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import fastsparse as fs


@pytest.mark.parametrize("fn", [fs.coupled_groups, fs.prune, fs.sparsity_report])
def test_parametrized_layer_is_refused_by_name(fn):
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), weight_norm(nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.raises(fs.PruningError, match=r"layer '2' .*parametrized"):
        fn(model, torch.randn(2, 5))
