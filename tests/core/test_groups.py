"""Transformer group builders: every layer's groups get a root name of their own by default."""

import torch

from fastsparse.core.groups import attention_head_groups, mlp_neuron_groups


def test_default_names_differ_between_layers():
    mlps = [
        mlp_neuron_groups(torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8)) for _ in "ab"
    ]
    assert mlps[0].root != mlps[1].root
    assert [m.name.split(".")[-1] for m in mlps[0].members] == ["gate", "up", "down"]
    heads = [
        attention_head_groups(*(torch.randn(8, 4) for _ in range(3)), torch.randn(4, 8), 2)
        for _ in "ab"
    ]
    assert heads[0].root != heads[1].root


def test_given_names_are_kept():
    names = ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down")
    group = mlp_neuron_groups(torch.randn(8, 4), torch.randn(8, 4), torch.randn(4, 8), names)
    assert group.root == names[0] and [m.name for m in group.members] == list(names)
