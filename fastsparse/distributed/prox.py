"""The prox op on DTensors: `prox_`, `scale_groups_` and their coupled forms, in place on each
rank's shards, with the single-process result.

`fastsparse.prox_` and `fastsparse.scale_groups_` validate a call and route DTensors here;
these functions trust their arguments (normalized and checked there) and check nothing again.
Call them directly only with arguments in that form.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from fastsparse import ops, reference
from fastsparse.core.contract import ELEMENT_PROX_KINDS, GROUP_DIMS, accumulation_dtype_of
from fastsparse.core.layout import addressable, encode_groupings
from fastsparse.distributed.mesh import common_mesh, local_range, local_shard, placements_of
from fastsparse.distributed.sharded import CoupledProblem, GroupedProblem
from fastsparse.engine import prox_factors

__all__ = ["coupled_prox_", "coupled_scale_groups_", "prox_", "scale_groups_"]


def prox_(tensors, kind, threshold, grouping, backend) -> list:
    """Proximal / threshold step of `fastsparse.prox_` on DTensors, in place on the shards.

    The element stage (l1, l0, and the l0 stage of l0_group_lasso) runs on each local shard
    (the fused prox kernels); the group stage scales each local group by the factor of its
    complete norm (partial s2 of groups that span ranks summed first). Returns the kept masks
    as DTensors [groups], placed like `group_norms`. `tensors` is a list, `grouping` one
    grouping, `kind` and `threshold` as validated by `fastsparse.prox_`.

    Example (under torchrun, parameters sharded by ``fully_shard``)::

        >>> masks = fastsparse.distributed.prox_(params, "group_lasso", 1e-3, "filters", "auto")
    """
    t_elem, t_group = reference.prox_thresholds(kind, threshold)
    problem = GroupedProblem(tensors, (grouping,), "l2", 0.5, backend)
    nonempty = [w for w in problem.locals if w.numel() > 0]
    with torch.no_grad():
        if kind in ("l1", "l0", "l0_group_lasso") and nonempty:
            element = "l0" if kind == "l0_group_lasso" else kind
            _local_element_prox_(nonempty, element, t_elem, grouping, problem.name)
        stats = problem.complete_stats(problem.local_stats())
        if kind in ELEMENT_PROX_KINDS:
            return problem.per_group([s[:, 0] > 0 for s in stats])
        factor_kind = "group_l0" if kind == "group_l0" else "group_lasso"
        masks = []
        for (ti, _), s in zip(problem.specs, stats):
            norms = torch.sqrt(s[:, 1])
            factors = prox_factors(norms, factor_kind, t_group)
            _scale_local_groups_(problem.locals[ti], grouping, factors)
            masks.append(norms > t_group)
    return problem.per_group(masks)


def coupled_prox_(coupled, kind, threshold, backend) -> list:
    """`fastsparse.prox_` on coupled groups (a list of `CoupledGroup`) of DTensor parameters, in
    place on the shards.

    Simultaneous, as the oracle: every factor comes from the norms before the group stage, an
    element is multiplied by the factor of each group that contains it, and the element kinds
    apply once to every element some group covers. Returns replicated DTensor masks [G].

    Example::

        >>> masks = fastsparse.distributed.coupled_prox_(groups, "group_l0", 1e-3, "auto")
    """
    t_elem, t_group = reference.prox_thresholds(kind, threshold)
    problem = CoupledProblem(coupled, "l2", 0.5, backend)
    acc = problem.acc
    with torch.no_grad():
        if kind in ("l1", "l0", "l0_group_lasso"):
            for ti, covered in enumerate(problem.covered()):
                w = problem.locals[ti]
                x = w.to(acc)
                if kind == "l1":
                    y = torch.sign(x) * torch.clamp(x.abs() - t_elem, min=0)
                else:
                    y = torch.where(x.abs() > t_elem, x, 0.0)
                w.copy_(torch.where(covered, y, x))
        stats = problem.group_stats(problem.local_stats())
        if kind in ELEMENT_PROX_KINDS:
            return problem.per_group(list(torch.split(stats[:, 0] > 0, problem.group_counts)))
        factor_kind = "group_l0" if kind == "group_l0" else "group_lasso"
        norms = torch.sqrt(stats[:, 1])
        problem.scale_groups_(prox_factors(norms, factor_kind, t_group))
    return problem.per_group(list(torch.split(norms > t_group, problem.group_counts)))


def scale_groups_(tensors, factors, grouping) -> None:
    """`fastsparse.scale_groups_` on DTensors: each local group times its factor, in place.

    `factors` are per tensor [groups], plain tensors holding every group or DTensors (as
    `group_norms` and `prox_` return them); each rank picks its shard's groups. No
    communication beyond gathering DTensor factors. Arguments as validated by
    `fastsparse.scale_groups_` (lists, one grouping, factors of the groups' counts).

    Example::

        >>> fastsparse.distributed.scale_groups_(params, masks, "filters")
    """
    mesh = common_mesh(tensors)
    with torch.no_grad():
        for t, f in zip(tensors, factors):
            f = f.full_tensor() if isinstance(f, DTensor) else f
            local = local_shard(t)
            if grouping in ("filters", "channels") and t.dim() > 0:
                dim = GROUP_DIMS[grouping][0]
                if t.dim() > dim:
                    start, size = local_range(t, placements_of(t, mesh), mesh, dim)
                    f = f[start : start + size]
            elif grouping == "kernels":
                placements = placements_of(t, mesh)
                r0, rows = local_range(t, placements, mesh, 0)
                c0, cols = local_range(t, placements, mesh, 1)
                f = f.reshape(t.shape[0], t.shape[1])[r0 : r0 + rows, c0 : c0 + cols].reshape(-1)
            _scale_local_groups_(
                local, grouping, f.to(local.device, accumulation_dtype_of([local]))
            )


def coupled_scale_groups_(coupled, factors, backend) -> None:
    """`fastsparse.scale_groups_` on coupled groups (a list) of DTensor parameters, in place:
    `factors` one [G] tensor (plain or DTensor) per CoupledGroup.

    Example::

        >>> fastsparse.distributed.coupled_scale_groups_(groups, masks, "auto")
    """
    problem = CoupledProblem(coupled, "l2", 0.5, backend)
    full = [f.full_tensor() if isinstance(f, DTensor) else f for f in factors]
    with torch.no_grad():
        problem.scale_groups_(torch.cat([f.to(problem.device, problem.acc) for f in full]))


def _local_element_prox_(shards, kind, threshold, grouping, backend) -> None:
    """The element stage ("l1" or "l0") on local shards, in place: it needs no communication."""
    if backend == "torch":
        reference.prox_(shards, kind, threshold, grouping)
        return
    weights = [w if addressable(w, (grouping,)) else w.contiguous() for w in shards]
    ops.call(
        ops.prox_op, weights, encode_groupings((grouping,)), kind, threshold, threshold, backend
    )
    for w, shard in zip(weights, shards):
        if w.data_ptr() != shard.data_ptr():
            shard.copy_(w)


def _scale_local_groups_(w: torch.Tensor, grouping, factors: torch.Tensor) -> None:
    """w *= factor of its group, computed in the factors' dtype and rounded once."""
    if w.numel() == 0:
        return
    if grouping is None or w.dim() == 0:
        shape = ()
    elif grouping == "filters":
        shape = (-1,) + (1,) * (w.dim() - 1)
    elif grouping == "channels":
        shape = (1, -1) + (1,) * (w.dim() - 2)
    else:  # kernels
        shape = tuple(w.shape[:2]) + (1,) * (w.dim() - 2)
    w.copy_(w.to(factors.dtype) * factors.reshape(shape))
