"""OICSR: out-in-channel sparsity regularization (Li, Gu, Van Gool and Timofte, CVPR 2019).

A filter's output channel c of layer l is useless without the in-channel c of the layer l+1 that
reads it, so OICSR regularizes them together: one group per channel, made of out-channel c of
layer l *and* in-channel c of layer l+1, and group lasso (or any group kind) over these groups

    R = sum_l sum_c || [W_l[c, ...], W_{l+1}[:, c, ...]] ||_2          (kind "group_lasso")

These are exactly the coupled groups of `fastsparse.coupled_groups`, which also follow
BatchNorm (the scale and shift of channel c, on by default: a channel is only removable once they
are zero too), biases, flattens (several Linear columns per channel) and residual additions (every
layer tied to channel c). Any kind of the contract applies to them: group_lasso (OICSR-GL, the
paper's main variant), l1l2, group_l1l2, hoyer_square, group_hoyer_square, sparse_group_lasso,
l1, l2.

The regularizer is a `fastsparse.Regularizer` over these coupled groups (``reg()`` /
``reg.apply_()``, any backend: ``backend="torch"`` is the oracle
``fastsparse.reference.coupled_penalty``).

API: :func:`oicsr_groups`, :func:`oicsr_regularizer` (the regularizer, and the study entry
point), :func:`prune_lowest_energy_` (the paper's global pruning by out-in-channel energy,
`fastsparse.pruning.importance.channel_energy`).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from fastsparse.core.groups import CoupledGroup
from fastsparse.methods.regularizer import Regularizer
from fastsparse.pruning.graph import coupled_groups
from fastsparse.pruning.importance import channel_energy, select_channels, zero_channels_

__all__ = ["oicsr_groups", "oicsr_regularizer", "prune_lowest_energy_"]

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def oicsr_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    batchnorm: bool = True,
    bias: bool = True,
) -> List[CoupledGroup]:
    """The out-in-channel groups of `model`: one CoupledGroup per prunable layer.

    Group c of a CoupledGroup: out-channel c of its root layer with the in-channel c of every
    layer that reads it (and, through residual additions, every layer tied to channel c).

    Args:
        model, example_inputs: as in ``fastsparse.coupled_groups``.
        batchnorm: keep the BatchNorm scale and shift of channel c in its group (default; needed
            for the channel to reach exactly zero and be removed). False gives the paper's
            weights-only groups.
        bias: keep conv/linear biases of channel c in its group.

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> groups = oicsr_groups(LeNet5(), torch.randn(1, 1, 28, 28), bias=False)
        >>> groups[0]
        CoupledGroup(root='features.0', num_groups=20, members=[features.0.weight[dim 0], \
features.3.weight[dim 1]])
    """
    groups = coupled_groups(model, example_inputs)
    if batchnorm and bias:
        return groups
    modules = dict(model.named_modules())
    out = []
    for cg in groups:
        members = []
        for m in cg.members:
            layer, _, attr = m.name.rpartition(".")
            if not batchnorm and isinstance(modules.get(layer), _BATCHNORM):
                continue
            if not bias and attr == "bias" and not isinstance(modules.get(layer), _BATCHNORM):
                continue
            members.append(m)
        out.append(CoupledGroup(cg.root, cg.num_groups, tuple(members)))
    return out


def prune_lowest_energy_(
    groups: List[CoupledGroup], ratio: float, *, normalize: bool = True
) -> List[torch.Tensor]:
    """Zero the `ratio` share of out-in-channels with the lowest energy, over the whole model.

    One round of OICSR's global pruning: channels are ranked together across layers by
    `fastsparse.pruning.importance.channel_energy` and the lowest are zeroed group-wide (every
    member slice), so ``fastsparse.prune(model, x)`` removes them losslessly. Iterate with
    fine-tuning in between for the paper's greedy schedule. Returns the dead masks, one bool [G]
    per group.

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> model, x = LeNet5(), torch.randn(1, 1, 28, 28)
        >>> dead = prune_lowest_energy_(oicsr_groups(model, x), 0.5)
        >>> sum(int(d.sum()) for d in dead)  # of 20 + 50 + 500 channels
        285
        >>> from fastsparse.pruning import prune
        >>> small = prune(model, x)  # removes them, losslessly
    """
    dead = select_channels(channel_energy(groups, normalize), ratio=ratio)
    zero_channels_(groups, dead)
    return dead


def oicsr_regularizer(
    model: nn.Module,
    example_inputs: Any,
    strength: float,
    kind: str = "group_lasso",
    *,
    batchnorm: bool = True,
    backend: Optional[str] = "auto",
    **options,
) -> Regularizer:
    """OICSR on every prunable layer of `model`: a `fastsparse.Regularizer` over the
    out-in-channel groups of :func:`oicsr_groups`.

    Args:
        model, example_inputs: the model and a batch to trace it with.
        strength: multiplier (>= 0), may be changed between steps.
        kind: any of ``fastsparse.KINDS``; "group_lasso" is OICSR-GL.
        batchnorm: as in :func:`oicsr_groups`.
        backend, options: as in ``fastsparse.penalty`` (alpha for "sparse_group_lasso").

    In the training loop: ``loss = criterion(model(x), y) + reg()``, or ``reg.apply_()`` after
    backward (``reg.attach(optimizer)``). After training, ``fastsparse.prune(model, x,
    threshold=t)`` removes the channels whose out-in-channel group norm is <= t (the same
    groups).

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> model, x = LeNet5(), torch.randn(2, 1, 28, 28)
        >>> reg = oicsr_regularizer(model, x[:1], 1e-4)
        >>> (model(x).square().mean() + reg()).backward()
        >>> len(reg.groups), reg.coupled
        (3, True)
    """
    groups = oicsr_groups(model, example_inputs, batchnorm=batchnorm)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no prunable out-in-channel group")
    return Regularizer(None, kind, strength, groups=groups, backend=backend, **options)
