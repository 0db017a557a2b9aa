"""Coupled groups (fastsparse.pruning.coupled_groups) laid out for the fused engine.

A CoupledGroup's group g is made of slices of several parameters (a conv's out-channel g, its
bias, the next BatchNorm's scale and shift, the next layer's in-channel g, ...). The engine sees
them as ordinary segments — one per (parameter, dim) touched: dim 0 is the "filters" grouping,
dim 1 the "channels" grouping — whose groups are slices, plus `slice_groups`, the coupled group
of every slice (-1 for slices in none). Slice statistics are then added per coupled group in a
fixed order (fastsparse/engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastsparse.layout import encode_specs
from fastsparse.reference import CoupledGroup

_GROUPING_OF_DIM = {0: "filters", 1: "channels"}


@dataclass
class CoupledLayout:
    params: list  # distinct parameters, in order of first appearance
    specs: str  # encoded (param index, grouping) per member, for the torch.library ops
    slice_groups: torch.Tensor  # int64 [slices of all specs], coupled group id or -1
    group_counts: list  # number of groups of each CoupledGroup


def coupled_layout(groups: list) -> CoupledLayout:
    """The engine's view of a list of CoupledGroups (cached on the first group's object)."""
    key = tuple((id(cg), tuple(id(m.param) for m in cg.members)) for cg in groups)
    cache = getattr(groups[0], "_fastsparse_layout", None) if groups else None
    if cache is not None and cache[0] == key:
        return cache[1]
    params, index_of, specs, slices = [], {}, [], []
    offset = 0
    for cg in groups:
        for m in cg.members:
            if m.dim not in _GROUPING_OF_DIM or m.param.dim() <= m.dim:
                raise ValueError(f"coupled group {cg.root!r}: {m.name} is sliced along dim {m.dim}")
            if id(m.param) not in index_of:
                index_of[id(m.param)] = len(params)
                params.append(m.param)
            specs.append((index_of[id(m.param)], _GROUPING_OF_DIM[m.dim], 0))
            ids = torch.full((m.param.shape[m.dim],), -1, dtype=torch.int64)
            ids[m.index.cpu()] = m.group.cpu() + offset
            slices.append(ids)
        offset += cg.num_groups
    slice_groups = torch.cat(slices) if slices else torch.zeros(0, dtype=torch.int64)
    layout = CoupledLayout(
        params, encode_specs(specs), slice_groups, [cg.num_groups for cg in groups]
    )
    if groups:
        groups[0]._fastsparse_layout = (key, layout)
    return layout


def as_coupled_list(groups) -> list:
    return [groups] if isinstance(groups, CoupledGroup) else list(groups)
