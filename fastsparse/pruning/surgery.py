"""Removing channels from layers, for real: the surgery after tracing (`fastsparse.pruning.graph`).

Torch-Pruning's dependency graph slices every member of a coupled group (filters, biases,
BatchNorm statistics, consumers' in-channels). Grouped convolutions (ResNeXt, RegNet) need more:
their weights are [out, in / groups, ...], so every conv group must lose as many channels as the
others (`balanced_channels` picks them), and their in-channels are removed conv group by conv
group (`remove_channels`), which Torch-Pruning's own in-channel surgery does not do.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from fastsparse.pruning.common import CONV, PruningError, is_grouped


def balanced_channels(
    channels: List[int], norms: torch.Tensor, balance: List[Tuple[torch.Tensor, int]]
) -> List[int]:
    """The largest subset of `channels` that leaves every grouped conv with as many channels in
    each of its conv groups as in the others: per conv, each conv group gives up as many as the
    conv group with the fewest (the lowest-norm ones go); repeated until no conv asks more."""
    keep = set(channels)
    changed = True
    while changed:
        changed = False
        for blocks, count in balance:
            per_block: List[List[int]] = [[] for _ in range(count)]
            for c in keep:
                if blocks[c] >= 0:
                    per_block[int(blocks[c])].append(c)
            k = min(len(b) for b in per_block)
            for b in per_block:
                if len(b) > k:
                    b.sort(key=lambda c: (float(norms[c]), c))
                    keep.difference_update(b[k:])
                    changed = True
    return sorted(keep)


def remove_channels(graph, root: nn.Module, channels: List[int]) -> None:
    """Remove `channels` of `root`'s coupled group: Torch-Pruning's surgery, except for the
    in-channels of grouped convolutions, which it does not remove per conv group."""
    pruning_fn = graph.get_pruner_of_module(root).prune_out_channels
    group = graph.get_pruning_group(root, pruning_fn, channels)
    for dep, idxs in group:
        module = dep.target.module
        if (
            isinstance(module, CONV)
            and is_grouped(module)
            and graph.is_in_channel_pruning_fn(dep.handler)
        ):
            _remove_grouped_in_channels(module, sorted({int(i) for i in idxs}))
        else:
            dep(idxs)


@torch.no_grad()
def _remove_grouped_in_channels(conv: nn.Module, channels: List[int]) -> None:
    groups, size = conv.groups, conv.in_channels // conv.groups
    removed = set(channels)
    kept = [
        [c - b * size for c in range(b * size, (b + 1) * size) if c not in removed]
        for b in range(groups)
    ]
    if len({len(k) for k in kept}) != 1:
        raise PruningError(f"{conv} would keep different numbers of in-channels in its conv groups")
    weight = conv.weight
    out_size, kernel = weight.shape[0] // groups, weight.shape[2:]
    index = torch.tensor(kept, device=weight.device).view(groups, 1, -1, *(1,) * len(kernel))
    index = index.expand(groups, out_size, index.shape[2], *kernel)
    new = weight.detach().reshape(groups, out_size, size, *kernel).gather(2, index)
    conv.weight = nn.Parameter(
        new.reshape(weight.shape[0], -1, *kernel).contiguous(), weight.requires_grad
    )
    conv.in_channels = len(kept[0]) * groups
