"""Choosing whole channels (coupled groups) by a score and zeroing them, for the pruning workflow.

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

from fastsparse.reference import CoupledGroup

__all__ = ["select_channels", "zero_channels_"]


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
        >>> from fastsparse.reference import CoupledMember
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
