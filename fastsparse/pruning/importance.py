"""Every scoring rule of whole channels (coupled groups); choosing channels by a score; zeroing.

Scores (higher = more important), one [G] tensor per CoupledGroup: the producers' norm that
`fastsparse.prune` reads (`producer_norms`, `dead_channels`), the filter norm, the BatchNorm
scale of network slimming (`channel_scales`) and the out-in-channel energy of OICSR
(`channel_energy`).

OICSR's global pruning (lowest out-in-channel energy) and network slimming (smallest BatchNorm
scale) pick channels by their own score, not by the coupled-group norm that `fastsparse.prune`
reads. They zero every slice of the chosen channels' coupled groups here; `fastsparse.prune(model,
x)` (threshold 0) then removes exactly those channels, losslessly with respect to the zeroed model.
The same result as ``fastsparse.prox_(None, "group_l0", t, groups=...)`` for a per-channel rule.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from fastsparse import reference
from fastsparse.core.groups import CoupledGroup

__all__ = [
    "channel_energy",
    "channel_scales",
    "dead_channels",
    "dead_masks",
    "filter_scores",
    "producer_norms",
    "removable_masks",
    "select_channels",
    "zero_channels_",
]


def select_channels(
    scores: Sequence[Optional[torch.Tensor]],
    *,
    ratio: Optional[float] = None,
    threshold: Optional[float] = None,
) -> List[torch.Tensor]:
    """Dead-channel masks from per-group channel scores, by a global ratio or a threshold.

    Args:
        scores: one 1-D tensor of channel scores per coupled group ([G]), or None for a group
            that is not scored (none of its channels is selected).
        ratio: select the floor(ratio * n) lowest-score channels over all scored groups (ties
            broken by order), or
        threshold: select the channels with score <= threshold.

    Returns:
        One bool tensor [G] per group (all False for unscored groups): True = dead.

    Example:
        >>> select_channels([torch.tensor([3.0, 1.0]), None, torch.tensor([2.0])], ratio=0.5)
        [tensor([False,  True]), tensor([], dtype=torch.bool), tensor([False])]
    """
    if (ratio is None) == (threshold is None):
        raise ValueError("give exactly one of ratio and threshold")
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
    if threshold is not None and math.isnan(threshold):
        raise ValueError("threshold is NaN")
    scored = [s.detach().double().cpu() for s in scores if s is not None]
    if threshold is not None:
        picks = iter([s <= threshold for s in scored])
    else:
        flat = torch.cat(scored) if scored else torch.zeros(0, dtype=torch.float64)
        k = int(math.floor(ratio * flat.numel() + 1e-9))
        dead = torch.zeros(flat.numel(), dtype=torch.bool)
        dead[torch.argsort(flat, stable=True)[:k]] = True
        picks = iter(torch.split(dead, [s.numel() for s in scored]))
    return [torch.zeros(0, dtype=torch.bool) if s is None else next(picks).clone() for s in scores]


@torch.no_grad()
def zero_channels_(groups: Sequence[CoupledGroup], dead: Sequence[torch.Tensor]) -> int:
    """Zero every member slice of the dead channels of each coupled group, in place.

    `dead[i]` is a bool [G_i] (or empty: nothing) for ``groups[i]``. Returns the number of
    channels zeroed.

    Example:
        >>> w = torch.ones(3, 2)
        >>> from fastsparse.core.groups import CoupledMember
        >>> m = CoupledMember("w", w, 0, torch.arange(3), torch.arange(3))
        >>> zero_channels_([CoupledGroup("w", 3, (m,))], [torch.tensor([False, True, False])])
        1
        >>> w[:, 0]
        tensor([1., 0., 1.])
    """
    if len(groups) != len(dead):
        raise ValueError(f"{len(groups)} groups but {len(dead)} masks")
    count = 0
    for cg, mask in zip(groups, dead):
        if mask.numel() == 0:
            continue
        if mask.shape != (cg.num_groups,):
            raise ValueError(f"mask of group {cg.root!r} has shape {tuple(mask.shape)}")
        mask = mask.cpu()
        count += int(mask.sum())
        for m in cg.members:
            rows = m.index[mask[m.group]]
            if rows.numel():
                m.param.index_fill_(m.dim, rows.to(m.param.device), 0.0)
    return count


def producer_norms(groups: List[CoupledGroup]) -> List[torch.Tensor]:
    """Per coupled group, the [G] l2 norms of what produces each channel (fp32; fp64 for fp64).

    The members sliced along dim 0: the root's filter and bias, a following BatchNorm's scale
    and shift, depthwise filters, every producer tied to it by a residual addition; not the
    consumers' input slices (dim 1). A channel whose producers are all zero outputs exactly zero
    (conv and linear layers map zero to zero through zero weights and bias, a BatchNorm with zero
    scale and shift outputs zero, elementwise ops keep zero at zero), so its consumers' slices
    multiply zeros, whatever they hold: the channel can be removed without changing the output.
    """
    producers = [
        CoupledGroup(cg.root, cg.num_groups, tuple(m for m in cg.members if m.dim == 0))
        for cg in groups
    ]
    return reference.coupled_group_norms(producers)


def dead_masks(groups: List[CoupledGroup], threshold: float, norms=None) -> List[torch.Tensor]:
    """Per group, bool [G]: the channels whose producers' norm is <= threshold (dead).

    `norms`: the groups' `producer_norms`, when the caller has them already."""
    norms = producer_norms(groups) if norms is None else norms
    return [n <= threshold for n in norms]


def removable_masks(norms: Sequence[torch.Tensor], threshold: float) -> List[torch.Tensor]:
    """Per group, bool [G] (CPU): the channels to remove, those whose norm is <= threshold, but
    never all of a layer's: when all are dead, the one with the largest norm stays.

    `norms`: one [G] tensor per group of what decides whether a channel is dead (`producer_norms`
    for traced groups, `fastsparse.pruning.transformer.removal_norms` for heads and neurons).

    Example:
        >>> removable_masks([torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.5])], 1.0)
        [tensor([ True, False]), tensor([ True, False])]
    """
    masks = []
    for n in norms:
        dead = (n <= threshold).cpu()
        if bool(dead.all()) and n.numel():
            dead[int(torch.argmax(n))] = False
        masks.append(dead)
    return masks


def dead_channels(groups: List[CoupledGroup], threshold: float, norms=None) -> List[List[int]]:
    """Per group, the dead channels to remove (`removable_masks` of the producers' norms)."""
    norms = producer_norms(groups) if norms is None else norms
    return [torch.nonzero(dead).flatten().tolist() for dead in removable_masks(norms, threshold)]


def channel_scales(groups: List[CoupledGroup]) -> List[Optional[torch.Tensor]]:
    """Per coupled group, the [G] slimming scores max |gamma| over its BatchNorm scales (fp64).

    A channel tied to several BatchNorms (residual additions) is only as removable as its
    largest scale. None for a group without BatchNorm (never slimmed). The BatchNorm scales of a
    group are its 1-D ``.weight`` members (conv and linear weights have 2 or more dims, and
    ``coupled_groups`` admits no other normalization layer).

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> channel_scales(coupled_groups(LeNet5(), torch.randn(1, 1, 28, 28)))
        [None, None, None]
    """
    scores = []
    for cg in groups:
        best = None
        for m in cg.members:
            if m.param.dim() != 1 or m.dim != 0 or not m.name.endswith(".weight"):
                continue
            gamma = m.param.detach().abs().double().cpu()[m.index]
            values = torch.zeros(cg.num_groups, dtype=torch.float64)
            values.scatter_reduce_(0, m.group, gamma, "amax")  # scores are >= 0
            best = values if best is None else torch.maximum(best, values)
        scores.append(best)
    return scores


def channel_energy(groups: List[CoupledGroup], normalize: bool = True) -> List[torch.Tensor]:
    """Per CoupledGroup, the [G] energies of its out-in-channels: sum of w^2 over the group.

    With `normalize`, divided by the group's number of elements (mean energy per weight), so
    channels of layers of different sizes compare on one scale for a global ranking.

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> energy = channel_energy(oicsr_groups(LeNet5(), torch.randn(1, 1, 28, 28)))
        >>> [e.shape[0] for e in energy]
        [20, 50, 500]
    """
    out = []
    for cg in groups:
        _, s2 = reference.coupled_group_stats(cg)
        s2 = s2.detach()
        if normalize:
            s2 = s2 / cg.group_sizes().clamp(min=1).to(s2)
        out.append(s2)
    return out


# The criteria of `filter_scores`.
PRUNE_CRITERIA = ("filter_norm", "bn_scale", "group_norm")


def filter_scores(groups, model: nn.Module, criterion: str) -> List[torch.Tensor]:
    """Per coupled group, one score per filter (fp64, CPU); see PRUNE_CRITERIA.

    ``"filter_norm"``: the l2 norm of the root layer's filter; ``"bn_scale"``: the largest |gamma|
    of the BatchNorms on the channel (network slimming; groups without BatchNorm keep the filter
    norm); ``"group_norm"``: the l2 norm of the whole coupled group (OICSR).
    """
    if criterion not in PRUNE_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(PRUNE_CRITERIA)}")
    norms = [
        model.get_submodule(g.root).weight.detach().flatten(1).double().norm(dim=1).cpu()
        for g in groups
    ]
    if criterion == "filter_norm":
        return norms
    if criterion == "bn_scale":
        return [s if s is not None else n for s, n in zip(channel_scales(groups), norms)]
    return [reference.coupled_group_stats(g)[1].detach().double().sqrt().cpu() for g in groups]
