"""The penalty op on DTensors: `penalty`, `add_penalty_grad_`, `group_norms` and their coupled
forms, each the single-process result (the value on every rank, each rank's shard of the
gradient or of the norms).

`fastsparse.penalty`, `fastsparse.add_penalty_grad_` and `fastsparse.group_norms` validate a
call and route DTensors here; these functions trust their arguments (normalized and checked
there) and check nothing again. Call them directly only with arguments in that form.
"""

from __future__ import annotations

import torch

from fastsparse.core.checks import allocate_missing_grads
from fastsparse.distributed.mesh import local_shard
from fastsparse.distributed.sharded import CoupledProblem, GroupedProblem, ShardedPenalty

__all__ = [
    "add_coupled_penalty_grad_",
    "add_penalty_grad_",
    "coupled_group_norms",
    "coupled_penalty",
    "group_norms",
    "penalty",
]


def penalty(tensors, kind, groupings, alpha, backend) -> torch.Tensor:
    """The penalty of DTensors (see `fastsparse.penalty`), differentiable: a plain 0-dim tensor,
    the same on every rank; backward writes each rank's gradient shard.

    `tensors` is a validated list, `groupings` a tuple, `alpha` a float (as `fastsparse.penalty`
    passes them).

    Example (under torchrun, parameters sharded by ``fully_shard``)::

        >>> value = fastsparse.distributed.penalty(params, "group_lasso", ("filters",), 0.5,
        ...                                        "auto")
    """
    problem = GroupedProblem(tensors, groupings, kind, alpha, backend)
    return ShardedPenalty.apply(problem, *problem.differentiable_locals())


def add_penalty_grad_(tensors, kind, strength, groupings, alpha, backend) -> torch.Tensor:
    """tensors[i].grad += strength * dR/dW_i on each rank's shard (a missing gradient is
    allocated as zeros); returns the value R, a plain 0-dim tensor. Arguments as validated by
    `fastsparse.add_penalty_grad_` (gradients checked, placed like their parameters).

    Example::

        >>> value = fastsparse.distributed.add_penalty_grad_(
        ...     params, "group_lasso", 1e-4, ("filters",), 0.5, "auto")
    """
    problem = GroupedProblem(tensors, groupings, kind, alpha, backend)
    return problem.add_grads_(_local_grads(tensors), strength)


def coupled_penalty(coupled, kind, alpha, backend) -> torch.Tensor:
    """The penalty of coupled groups (a list of `CoupledGroup`) whose parameters are DTensors;
    differentiable, a plain 0-dim tensor. Arguments as validated by `fastsparse.penalty`.

    Example::

        >>> value = fastsparse.distributed.coupled_penalty(groups, "group_lasso", 0.5, "auto")
    """
    problem = CoupledProblem(coupled, kind, alpha, backend)
    return ShardedPenalty.apply(problem, *problem.differentiable_locals())


def add_coupled_penalty_grad_(coupled, kind, strength, alpha, backend) -> torch.Tensor:
    """The in-place gradient of coupled groups (a list) of DTensor parameters, on each rank's
    shards; returns the value. Arguments as validated by `fastsparse.add_penalty_grad_`.

    Example::

        >>> value = fastsparse.distributed.add_coupled_penalty_grad_(
        ...     groups, "group_lasso", 1e-4, 0.5, "auto")
    """
    problem = CoupledProblem(coupled, kind, alpha, backend)
    return problem.add_grads_(_local_grads(problem.tensors), strength)


def group_norms(tensors, grouping, backend) -> list:
    """Per DTensor, a DTensor of its group l2 norms, shape [groups] (fp32; fp64 for fp64).

    Sharded like the groups where the shards keep groups whole ("filters" and Shard(0),
    "channels" and Shard(1)), else replicated: the partial s2 of groups that span ranks are
    summed; "kernels" norms of sharded kernels are gathered ([O * C] is not split like [O, C]).
    `grouping` is one grouping, validated by `fastsparse.group_norms`.

    Example::

        >>> norms = fastsparse.distributed.group_norms(params, "filters", "auto")
        >>> norms[0].full_tensor().shape  # [rows of params[0]]
    """
    problem = GroupedProblem(tensors, (grouping,), "l2", 0.5, backend)
    stats = problem.complete_stats(problem.local_stats())
    return problem.per_group([torch.sqrt(s[:, 1]).to(problem.acc) for s in stats])


def coupled_group_norms(coupled, backend) -> list:
    """Per CoupledGroup (of a validated list), a replicated DTensor [G] of its group norms.

    Example::

        >>> norms = fastsparse.distributed.coupled_group_norms(groups, "auto")
    """
    problem = CoupledProblem(coupled, "l2", 0.5, backend)
    stats = problem.group_stats(problem.local_stats())
    norms = torch.sqrt(stats[:, 1]).to(problem.acc)
    return problem.per_group(list(torch.split(norms, problem.group_counts)))


def _local_grads(tensors) -> list:
    """The local shards of the tensors' gradients (allocated as zeros when missing)."""
    allocate_missing_grads(tensors)
    return [local_shard(t.grad) for t in tensors]
