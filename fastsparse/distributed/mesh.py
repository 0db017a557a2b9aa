"""Device meshes, placements and collectives: what the sharded computation needs to know of a
DTensor's layout, and the one collective it uses (SUM all-reduces over mesh dimensions).

The placements were validated by `fastsparse.core.checks.check_tensors` (one mesh, Shard(d) or
Replicate on every mesh dimension of size > 1): nothing here checks them again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from fastsparse.core.contract import GROUP_DIMS

__all__ = [
    "all_reduce_sum",
    "common_mesh",
    "full_tensor",
    "local_range",
    "local_shard",
    "placements_of",
    "shard_roles",
]


def common_mesh(tensors):
    """The device mesh of the DTensors among `tensors` (one mesh for all, as validated)."""
    return next(t.device_mesh for t in tensors if isinstance(t, DTensor))


def placements_of(t, mesh) -> list:
    """A DTensor's placements; a plain tensor counts as replicated (the same on every rank), as
    are the unsharded parameters FSDP2 leaves on the root module between forward and backward
    (their gradient then goes through FSDP2's reduce-scatter, which averages equal values)."""
    return list(t.placements) if isinstance(t, DTensor) else [Replicate()] * mesh.ndim


def local_shard(t) -> torch.Tensor:
    """The rank's local shard (differentiable: its gradient flows back to the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_roles(placements, mesh, grouping) -> tuple[tuple, tuple]:
    """(span, spread): the mesh dims whose shards split this grouping's groups between ranks,
    and those whose shards hold different whole groups. Other mesh dims need nothing."""
    span, spread = [], []
    for d, p in enumerate(placements):
        if mesh.size(d) == 1 or p.is_replicate():
            continue
        (spread if p.dim in GROUP_DIMS[grouping] else span).append(d)
    return tuple(span), tuple(spread)


def local_range(t, placements, mesh, dim: int) -> tuple[int, int]:
    """(global index of the first local slice along dim, local size along dim)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    return offset[dim], shape[dim]


def all_reduce_sum(items, mesh) -> None:
    """SUM each tensor of `items` = [(tensor, mesh dims)] over its mesh dims, in place.

    One all-reduce per mesh dim carries every tensor reduced over it (flattened together); the
    mesh dims are visited in order, so a tensor reduced over several ends with the full sum.
    """
    for d in range(mesh.ndim):
        chosen = [t for t, dims in items if d in dims]
        if not chosen:
            continue
        flat = torch.cat([t.reshape(-1) for t in chosen])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        for t, piece in zip(chosen, torch.split(flat, [t.numel() for t in chosen])):
            t.copy_(piece.reshape(t.shape))


def full_tensor(t: DTensor) -> torch.Tensor:
    """The full tensor of a DTensor on every rank (bool through uint8: gloo has no bool)."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8).full_tensor().to(torch.bool)
    return t.full_tensor()
