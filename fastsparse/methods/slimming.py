"""Network slimming: l1 on BatchNorm scales (Liu, Li, Shen, Huang, Yan and Zhang, ICCV 2017).

Every BatchNorm channel c has a scale gamma_c that multiplies the whole channel. Training with

    loss + lambda * sum_c |gamma_c|

drives the scales of unneeded channels toward zero; the channels with the smallest |gamma| over
the whole network (a global ratio or threshold) are then removed and the network is fine-tuned.

**The regularizer** is the engine's fused l1 penalty over the BatchNorm weights:
``fastsparse.Regularizer(bn_scales(model), "l1", strength, groups="filters")`` (a 1-D tensor has
one group per element, so this is exactly lambda * sum |gamma|), see :func:`slimming_regularizer`.
For exact zeros during training, a proximal step on the scales after each optimizer step
(:func:`prox_bn_scales_`: soft threshold by lr * lambda) can replace the subgradient.

**Removal.** A channel with gamma_c = 0 still outputs its shift beta_c, so removing it is not
lossless by itself; slimming accepts that change and fine-tunes. Here :func:`slim_` makes the
change explicit and the removal exact: it picks the channels by |gamma| (the largest |gamma| among
the BatchNorms tied to a channel, e.g. through residual additions), then zeroes their *whole*
coupled groups (filter, bias, gamma and beta, the consumers' in-slices) with
``fastsparse.pruning.importance.zero_channels_``, the per-channel form of
``prox_(None, "group_l0", t, groups=coupled)``. ``fastsparse.prune(model, x)`` then removes those
channels and the pruned model computes exactly what the slimmed one computes.

API: :func:`bn_scales`, :func:`slimming_regularizer` (the study entry point),
:func:`prox_bn_scales_`, :func:`channel_scales`, :func:`slim_`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import nn

from fastsparse.core.groups import CoupledGroup
from fastsparse.functional.prox import prox_
from fastsparse.methods.regularizer import Regularizer
from fastsparse.pruning.graph import coupled_groups
from fastsparse.pruning.importance import channel_scales, select_channels, zero_channels_

__all__ = [
    "SlimmingResult",
    "bn_scales",
    "prox_bn_scales_",
    "slim_",
    "slimming_regularizer",
]

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def bn_scales(model: nn.Module) -> List[nn.Parameter]:
    """The scales (weights) of the model's affine BatchNorm layers, in module order.

    Example:
        >>> from fastsparse.workflow.models import vgg11_bn
        >>> len(bn_scales(vgg11_bn()))
        8
    """
    return [m.weight for m in model.modules() if isinstance(m, _BATCHNORM) and m.weight is not None]


def slimming_regularizer(
    model: nn.Module, strength: float, *, backend: Optional[str] = "auto"
) -> Regularizer:
    """lambda * sum |gamma| over the model's BatchNorm scales, as a fused `Regularizer`.

    The study entry point: ``loss = criterion(out, y) + reg()`` or ``reg.apply_()`` after
    backward; after training, :func:`slim_` then ``fastsparse.prune``.

    Example:
        >>> from fastsparse.workflow.models import vgg11_bn
        >>> reg = slimming_regularizer(vgg11_bn(), 1e-4, backend="torch")
        >>> float(reg.value())  # 64 + 128 + 2 * 256 + 4 * 512 unit scales
        2752.0
    """
    scales = bn_scales(model)
    if not scales:
        raise ValueError(f"{type(model).__name__} has no affine BatchNorm layer to slim")
    return Regularizer(scales, "l1", strength, groups="filters", backend=backend)


def prox_bn_scales_(model: nn.Module, step: float, *, backend: str = "auto") -> List[torch.Tensor]:
    """Soft-threshold the BatchNorm scales by `step` (= lr * lambda), in place.

    The proximal step of the l1 penalty: after ``optimizer.step()`` on the unregularized loss it
    gives exact zeros, where the subgradient only oscillates around them. Returns one bool mask
    per BatchNorm (True where gamma != 0).
    """
    return prox_(bn_scales(model), "l1", step, groups="filters", backend=backend)


@dataclass
class SlimmingResult:
    """What :func:`slim_` zeroed.

    Attributes:
        groups: the coupled groups it used.
        dead: one bool [G] per group, True for a zeroed channel.
        channels: number of channels zeroed.
        scored: number of channels that had a BatchNorm scale (the population of `ratio`).
    """

    groups: List[CoupledGroup]
    dead: List[torch.Tensor]
    channels: int
    scored: int


def slim_(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    ratio: Optional[float] = None,
    threshold: Optional[float] = None,
    groups: Optional[List[CoupledGroup]] = None,
) -> SlimmingResult:
    """Zero the channels with the smallest BatchNorm scales, whole coupled group at a time.

    Args:
        model: the trained network (modified in place).
        example_inputs: to trace the coupled groups (not needed when `groups` is given).
        ratio: zero this share of all scored channels (global ranking by max |gamma|), or
        threshold: zero the channels with max |gamma| <= threshold.
        groups: coupled groups of `model` (``fastsparse.coupled_groups(model, x)``).

    Then ``fastsparse.prune(model, x)`` removes the zeroed channels (losslessly with respect to
    the slimmed model). Channels whose groups reach the model's outputs or inputs are never
    candidates (``coupled_groups`` leaves them out).

    Example:
        >>> from fastsparse.workflow.models import VGG
        >>> from fastsparse.pruning import prune
        >>> model, x = VGG(((8,), (16,))), torch.randn(2, 3, 8, 8)
        >>> result = slim_(model, x, ratio=0.25)
        >>> result.channels, result.scored
        (6, 24)
        >>> prune(model, x).features[0].out_channels + prune(model, x).features[4].out_channels
        18
    """
    if groups is None:
        if example_inputs is None:
            raise ValueError("give example_inputs (to trace the coupled groups) or groups")
        groups = coupled_groups(model, example_inputs)
    scores = channel_scales(groups)
    dead = select_channels(scores, ratio=ratio, threshold=threshold)
    channels = zero_channels_(groups, dead)
    scored = sum(s.numel() for s in scores if s is not None)
    return SlimmingResult(list(groups), dead, channels, scored)
