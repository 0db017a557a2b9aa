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

Penalty backend: the coupled-group penalty is computed by ``fastsparse.penalty(params, kind,
groups=coupled)`` (the fused coupled-group engine); the one line ``FUSED_COUPLED = False`` below
routes it to the oracle ``fastsparse.reference.coupled_penalty`` instead.

API: :func:`oicsr_groups`, :class:`OICSR` (the regularizer: ``reg()`` / ``reg.apply_()``),
:func:`channel_energy` and :func:`prune_lowest_energy_` (the paper's global pruning by
out-in-channel energy), :func:`oicsr_regularizer` (the study entry point).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from fastsparse import reference
from fastsparse.core.checks import check_kind, check_strength
from fastsparse.core.groups import CoupledGroup, coupled_params, is_coupled
from fastsparse.functional.penalty import add_penalty_grad_, penalty
from fastsparse.methods.regularizer import Regularizer
from fastsparse.pruning.graph import coupled_groups
from fastsparse.pruning.importance import channel_energy, select_channels, zero_channels_

__all__ = [
    "OICSR",
    "channel_energy",
    "oicsr_groups",
    "oicsr_regularizer",
    "prune_lowest_energy_",
]

# True: the penalty and its gradient go through fastsparse.penalty / add_penalty_grad_ with
# groups=coupled (the fused coupled-group engine, any backend); False: the oracle
# (reference.coupled_penalty / coupled_penalty_grad), for comparisons.
FUSED_COUPLED = True

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


class OICSR:
    """OICSR regularizer: a penalty kind over out-in-channel (coupled) groups.

    Args:
        groups: from :func:`oicsr_groups` (or ``fastsparse.coupled_groups``).
        kind: any of ``fastsparse.KINDS``; "group_lasso" is OICSR-GL.
        strength: multiplier (>= 0), may be changed between steps.
        backend: as in ``fastsparse.penalty`` (used once the fused coupled path is on).
        options: alpha for "sparse_group_lasso".

    Use ``loss = loss + reg()`` (autograd) or ``reg.apply_()`` after backward (in place), or
    ``reg.attach(optimizer)``.

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> model, x = LeNet5(), torch.randn(2, 1, 28, 28)
        >>> reg = OICSR(oicsr_groups(model, x[:1]), "group_lasso", 1e-4)
        >>> (model(x).square().mean() + reg()).backward()
    """

    def __init__(
        self,
        groups: List[CoupledGroup],
        kind: str = "group_lasso",
        strength: float = 1e-4,
        *,
        backend: Optional[str] = "auto",
        **options,
    ):
        if isinstance(groups, CoupledGroup):
            groups = [groups]
        groups = list(groups)
        if not is_coupled(groups) or not groups:
            raise ValueError("groups must be a non-empty list of CoupledGroup (oicsr_groups)")
        self.alpha = check_kind(kind, options)
        self.groups = groups
        self.params = coupled_params(groups)
        self.kind = kind
        self.strength = check_strength(strength)
        self.backend = backend
        self.options = options

    def _penalty(self) -> torch.Tensor:
        if FUSED_COUPLED:
            return penalty(
                self.params, self.kind, groups=self.groups, backend=self.backend, **self.options
            )
        return reference.coupled_penalty(self.groups, self.kind, self.alpha)

    def __call__(self) -> torch.Tensor:
        """strength * R as a differentiable loss term."""
        return self.strength * self._penalty()

    def value(self) -> torch.Tensor:
        """R without gradient tracking (for logging)."""
        with torch.no_grad():
            return self._penalty()

    def apply_(self) -> torch.Tensor:
        """Add strength * dR/dW into the parameters' .grad in place; returns strength * R."""
        if FUSED_COUPLED:
            value = add_penalty_grad_(
                self.params,
                self.kind,
                self.strength,
                groups=self.groups,
                backend=self.backend,
                **self.options,
            )
            return self.strength * value
        with torch.no_grad():
            value = reference.coupled_penalty(self.groups, self.kind, self.alpha)
            grads = reference.coupled_penalty_grad(self.groups, self.kind, self.alpha)
            for p, g in zip(self.params, grads):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g.to(p.grad.dtype), alpha=self.strength)
        return self.strength * value

    attach = Regularizer.attach  # apply_() before every optimizer.step()

    def __repr__(self) -> str:
        return (
            f"OICSR(kind={self.kind!r}, strength={self.strength}, groups={len(self.groups)}, "
            f"channels={sum(g.num_groups for g in self.groups)}, backend={self.backend!r})"
        )


def prune_lowest_energy_(
    groups: List[CoupledGroup], ratio: float, *, normalize: bool = True
) -> List[torch.Tensor]:
    """Zero the `ratio` share of out-in-channels with the lowest energy, over the whole model.

    One round of OICSR's global pruning: channels are ranked together across layers by
    :func:`channel_energy` and the lowest are zeroed group-wide (every member slice), so
    ``fastsparse.prune(model, x)`` removes them losslessly. Iterate with fine-tuning in between
    for the paper's greedy schedule. Returns the dead masks, one bool [G] per group.

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
) -> OICSR:
    """OICSR on every prunable layer of `model` (the study entry point).

    In the training loop: ``loss = criterion(model(x), y) + reg()``, or ``reg.apply_()`` after
    backward. After training, ``fastsparse.prune(model, x, threshold=t)`` removes the channels
    whose out-in-channel group norm is <= t (the same groups).

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> reg = oicsr_regularizer(LeNet5(), torch.randn(1, 1, 28, 28), 1e-4)
    """
    groups = oicsr_groups(model, example_inputs, batchnorm=batchnorm)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no prunable out-in-channel group")
    return OICSR(groups, kind, strength, backend=backend, **options)
