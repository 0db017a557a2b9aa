"""Sharded parameters: penalties, in-place gradients, group norms and prox steps on DTensors.

`fastsparse.penalty`, `add_penalty_grad_` and `group_norms` route DTensor inputs here: the
parameters of FSDP2's `fully_shard` (placement Shard(0); HSDP: Replicate, Shard(0)), of tensor
parallelism (Shard(0) or Shard(1)) or replicated ones (Replicate), on any device mesh. The
result is exact: the value is the single-process value, on every rank, and each rank's gradient
shard is the matching slice of the single-process gradient. `prox_` and `coupled_prox_` are the
prox steps of `fastsparse.prox_` on DTensors (the same group statistics, then per-group factors
applied to the local shards).

How. A penalty is determined by per-group statistics (s1, s2) = (sum |w|, sum w^2); the
gradient of an element of group g is a_g * sign(w) + b_g * w, where (a_g, b_g) follow from the
group's statistics (and, for the across-group kinds, from the per-tensor sums L = sum_g n_g and
F^2 = sum_g s2_g). So each rank

1. computes the statistics of the groups of its local shard with the fused kernels
   (`fastsparse::group_stats`; the oracle for backend "torch"),
2. completes them across ranks (below),
3. applies the coefficient rule to the complete statistics (O(groups), plain PyTorch),
4. writes the gradient of its local elements from their groups' (a_g, b_g) with the fused
   kernels (`fastsparse::penalty_backward_flat` for autograd, `fastsparse::add_coefficient_grad_`
   in place): no communication in the backward.

Communication (SUM all-reduces over the mesh dimensions that shard something; nothing crosses a
dimension of size 1 or a Replicate one). For a (tensor, grouping) pair and a mesh dimension that
shards tensor dim d:

- d is one of the grouping's dims ("filters" and Shard(0), "channels" and Shard(1), "kernels"
  and Shard(0) or Shard(1)): every group lies on one rank. Only the pair's partial sums cross:
  (sum of the group values, L, F^2), three numbers per pair.
- otherwise ("filters" and Shard(1), "channels" and Shard(0), None): a group spans the ranks.
  Its partial (s1, s2) are summed: 2 numbers per group of the pair.

All pairs of a call travel in one all-reduce per mesh dimension (two rounds only for a pair that
is split one way on one mesh dimension and the other way on another). Within-group kinds on
pairs whose groups are all local (FSDP2 with "filters" or "kernels") take the engine's one-pass
ops on the local shards and all-reduce just the scalar value. Coupled groups (`CoupledGroup`,
whose members may be sharded along different dims) sum the partial (s1, s2) of all their groups:
2 numbers per coupled group. A parameter replicated on a mesh dimension counts once (on the rank
of coordinate 0 there). The value is returned as a plain 0-dim tensor, the same on every rank,
so that it adds to a loss computed from plain tensors (FSDP2 activations are plain).

Example (under torchrun; see examples/fsdp_llm.py)::

    model = fully_shard(model)                    # parameters become DTensors, Shard(0)
    params = [p for p in model.parameters() if p.dim() == 2]  # keep the sharded parameters:
    loss = criterion(model(x), y) + 1e-4 * fastsparse.penalty(params, "group_lasso")
    loss.backward()                               # each rank gets its gradient shard

Plain tensors among DTensors count as replicated (the same on every rank): between forward and
backward, FSDP2 leaves the root module's parameters unsharded plain tensors, whose penalty
gradient then goes through FSDP2's reduce-scatter (an average of equal values). Holding the
sharded parameters (taken after `fully_shard`, as the optimizer does) avoids that full-size work.

DDP (`DistributedDataParallel`): parameters are plain tensors, identical on every rank, so
nothing here is needed. The autograd path (penalty in the loss) works as is: its gradient is
all-reduced with the rest, and since it is the same on every rank the average leaves it
unchanged. Call the in-place path after `loss.backward()` returns (DDP's gradient all-reduce has
then completed) and before `optimizer.step()`, on every rank: every rank adds the same gradient
to the same averaged gradient, so the parameters stay identical, with no communication. (Not
before, in a comm hook: a hook sees flattened buckets, not whole tensors, and the across-group
kinds need every tensor's statistics. With gradient accumulation under `no_sync`, call it once
per optimizer step.)
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from fastsparse import reference
from fastsparse.backends import resolve_backend
from fastsparse.core.checks import (
    check_grads,
    check_grouping,
    check_prox_kind,
    check_threshold,
    prox_tensor_list,
)
from fastsparse.core.contract import (
    ACROSS_GROUP_KINDS,
    ELEMENT_PROX_KINDS,
    GROUP_DIMS,
    GROUPING_OF_DIM,
    accumulation_dtype_of,
    grad_dtype,
)
from fastsparse.core.groups import as_coupled_list
from fastsparse.core.layout import addressable, encode_groupings, encode_specs, group_count
from fastsparse.engine import prox_factors

__all__ = [
    "add_coupled_penalty_grad_",
    "add_penalty_grad_",
    "coupled_group_norms",
    "coupled_penalty",
    "coupled_prox_",
    "group_norms",
    "penalty",
    "prox_",
]

# Coupled layouts of sharded parameters, cached per list of groups (keyed weakly by its first).
_SHARDED_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --- the public functions (validated by fastsparse/functional, which routes DTensors here) ------


def penalty(tensors, kind, groupings, alpha, backend) -> torch.Tensor:
    """The penalty of DTensors (see fastsparse.penalty), differentiable; a plain 0-dim tensor."""
    problem = _Grouped(tensors, groupings, kind, alpha, backend)
    return _Penalty.apply(problem, *problem.differentiable_locals())


def add_penalty_grad_(tensors, kind, strength, groupings, alpha, backend) -> torch.Tensor:
    """tensors[i].grad += strength * dR/dW_i on each rank's shard; returns the value R."""
    problem = _Grouped(tensors, groupings, kind, alpha, backend)
    return problem.add_grads_(_local_grads(tensors), strength)


def coupled_penalty(coupled, kind, alpha, backend) -> torch.Tensor:
    """The penalty of coupled groups whose parameters are DTensors; differentiable."""
    problem = _Coupled(coupled, kind, alpha, backend)
    return _Penalty.apply(problem, *problem.differentiable_locals())


def add_coupled_penalty_grad_(coupled, kind, strength, alpha, backend) -> torch.Tensor:
    """The in-place gradient of coupled groups of DTensor parameters; returns the value."""
    problem = _Coupled(coupled, kind, alpha, backend)
    check_grads(problem.tensors)
    return problem.add_grads_(_local_grads(problem.tensors), strength)


def group_norms(tensors, grouping, backend) -> list:
    """Per DTensor, a DTensor of its group l2 norms, shape [groups] (fp32; fp64 for fp64).

    Sharded like the groups where the shards keep groups whole ("filters" and Shard(0),
    "channels" and Shard(1)), else replicated: the partial s2 of groups that span ranks are
    summed; "kernels" norms of sharded kernels are gathered ([O * C] is not split like [O, C]).
    """
    problem = _Grouped(tensors, (grouping,), "l2", 0.5, backend)
    stats = problem.complete_stats(problem.local_stats())
    return problem.per_group([torch.sqrt(s[:, 1]).to(problem.acc) for s in stats])


def coupled_group_norms(coupled, backend) -> list:
    """Per CoupledGroup, a replicated DTensor [G] of its coupled group norms."""
    problem = _Coupled(coupled, "l2", 0.5, backend)
    stats = problem.group_stats(problem.local_stats())
    norms = torch.sqrt(stats[:, 1]).to(problem.acc)
    return problem.per_group(list(torch.split(norms, problem.group_counts)))


def prox_(tensors, kind, threshold, grouping, backend) -> list:
    """Proximal / threshold step of `fastsparse.prox_` on DTensors, in place on the shards.

    The element stage (l1, l0, and the l0 stage of l0_group_lasso) runs on each local shard
    (the fused prox kernels); the group stage scales each local group by the factor of its
    complete norm (partial s2 of groups that span ranks summed first). Returns the kept masks
    as DTensors [groups], placed like `group_norms`.

    Example:
        >>> masks = fastsparse.distributed.prox_(params, "group_lasso", 1e-3, "filters", "auto")
    """
    tensors = prox_tensor_list(tensors)
    check_prox_kind(kind)
    check_threshold(kind, threshold)
    check_grouping(grouping, tensors)
    t_elem, t_group = reference.prox_thresholds(kind, threshold)
    problem = _Grouped(tensors, (grouping,), "l2", 0.5, backend)
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
            _scale_groups_(problem.locals[ti], grouping, prox_factors(norms, factor_kind, t_group))
            masks.append(norms > t_group)
    return problem.per_group(masks)


def coupled_prox_(coupled, kind, threshold, backend) -> list:
    """`fastsparse.prox_` on coupled groups of DTensor parameters, in place on the shards.

    Simultaneous, as the oracle: every factor comes from the norms before the group stage, an
    element is multiplied by the factor of each group that contains it, and the element kinds
    apply once to every element some group covers. Returns replicated DTensor masks [G].
    """
    check_prox_kind(kind)
    check_threshold(kind, threshold)
    t_elem, t_group = reference.prox_thresholds(kind, threshold)
    problem = _Coupled(as_coupled_list(coupled), "l2", 0.5, backend)
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
    communication beyond gathering DTensor factors.
    """
    tensors = prox_tensor_list(tensors)
    mesh = _common_mesh(tensors)
    with torch.no_grad():
        for t, f in zip(tensors, factors):
            f = f.full_tensor() if isinstance(f, DTensor) else f
            local = _local(t)
            if grouping in ("filters", "channels") and t.dim() > 0:
                dim = GROUP_DIMS[grouping][0]
                if t.dim() > dim:
                    start, size = _local_range(t, _placements(t, mesh), mesh, dim)
                    f = f[start : start + size]
            elif grouping == "kernels":
                placements = _placements(t, mesh)
                r0, rows = _local_range(t, placements, mesh, 0)
                c0, cols = _local_range(t, placements, mesh, 1)
                f = f.reshape(t.shape[0], t.shape[1])[r0 : r0 + rows, c0 : c0 + cols].reshape(-1)
            _scale_groups_(local, grouping, f.to(local.device, accumulation_dtype_of([local])))


def coupled_scale_groups_(coupled, factors, backend) -> None:
    """`fastsparse.scale_groups_` on coupled groups of DTensor parameters, in place."""
    problem = _Coupled(as_coupled_list(coupled), "l2", 0.5, backend)
    full = [f.full_tensor() if isinstance(f, DTensor) else f for f in factors]
    with torch.no_grad():
        problem.scale_groups_(torch.cat([f.to(problem._device(), problem.acc) for f in full]))


def _local_element_prox_(shards, kind, threshold, grouping, backend) -> None:
    """The element stage ("l1" or "l0") on local shards, in place: it needs no communication."""
    if backend == "torch":
        reference.prox_(shards, kind, threshold, grouping)
        return
    from fastsparse import ops

    weights = [w if addressable(w, (grouping,)) else w.contiguous() for w in shards]
    ops.call(
        ops.prox_op, weights, encode_groupings((grouping,)), kind, threshold, threshold, backend
    )
    for w, shard in zip(weights, shards):
        if w.data_ptr() != shard.data_ptr():
            shard.copy_(w)


def _scale_groups_(w: torch.Tensor, grouping, factors: torch.Tensor) -> None:
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


# --- the computation on local shards --------------------------------------------------------


class _Penalty(torch.autograd.Function):
    """value = R(shards); backward: each local shard's gradient from its groups' coefficients."""

    @staticmethod
    def forward(ctx, problem, *locals_):
        value, coefs = problem.value_and_coefs()
        ctx.problem = problem
        ctx.save_for_backward(coefs, *locals_)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        coefs, *locals_ = ctx.saved_tensors
        return (None, *ctx.problem.gradients(locals_, coefs, grad_value))


class _Sharded:
    """Local shards cut into segments (tensor index, grouping) as the engine cuts tensors.

    Subclasses say how segments map to groups across ranks (`complete`): plain groupings
    (_Grouped) or coupled groups (_Coupled). Attributes: tensors (the DTensors), locals (their
    local shards, detached), specs, mesh, kind, alpha, name (resolved backend), acc (dtype).
    """

    def __init__(self, tensors, specs, kind, alpha, backend):
        self.mesh = _common_mesh(tensors)
        self.tensors = tensors
        self.placements = [_placements(t, self.mesh) for t in tensors]
        self.locals = [_local(t).detach() for t in tensors]
        self.specs = specs
        self.kind, self.alpha = kind, alpha
        self.acc = accumulation_dtype_of(tensors)
        device = self.locals[0].device if self.locals else torch.device("cpu")
        self.name = resolve_backend(backend, device)
        # Segments on empty shards have no rows in the engine's plans: they are left out of
        # the fused calls (their statistics are 0, their gradients empty).
        self.live = [k for k, (ti, _) in enumerate(specs) if self.locals[ti].numel() > 0]
        self.counts = [group_count(self.locals[ti].shape, g) for ti, g in specs]

    def differentiable_locals(self) -> list:
        return [_local(t) for t in self.tensors]

    # Fused calls see the live tensors only, numbered in order, with explicit specs.
    def _fused_args(self, locals_):
        used = sorted({self.specs[k][0] for k in self.live})
        index = {ti: i for i, ti in enumerate(used)}
        weights = []
        for ti in used:
            w = locals_[ti]
            groupings = {g for t, g in self.specs if t == ti}
            weights.append(w if addressable(w, groupings) else w.contiguous())
        specs = encode_specs([(index[self.specs[k][0]], self.specs[k][1], 0) for k in self.live])
        return used, weights, specs

    def _live_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """The rows of live segments, in order, of a [sum(counts), ...] tensor."""
        pieces = list(torch.split(flat, self.counts))
        return torch.cat([pieces[k] for k in self.live]) if self.live else flat[:0]

    def local_stats(self) -> list:
        """Per segment, [local groups, 2] = (s1, s2) of its groups on this rank's shard."""
        rows = [torch.zeros(c, 2, dtype=self.acc, device=self._device()) for c in self.counts]
        if not self.live:
            return rows
        if self.name == "torch":
            for k in self.live:
                ti, g = self.specs[k]
                rows[k] = torch.stack(reference.group_stats(self.locals[ti], g), 1).to(self.acc)
            return rows
        from fastsparse import ops

        _, weights, specs = self._fused_args(self.locals)
        flat = ops.call(ops.group_stats_op, weights, specs, self.name).to(self.acc)
        for k, piece in zip(self.live, torch.split(flat, [self.counts[k] for k in self.live])):
            rows[k] = piece
        return rows

    def _device(self):
        return self.locals[0].device if self.locals else torch.device("cpu")

    def value_and_coefs(self):
        """(value, coefs [sum(counts), 2] in segment order), the only communication."""
        value, coefs = self.complete(self.local_stats())
        return value.to(self.acc), coefs.to(self.acc)

    def gradients(self, locals_, coefs, grad_value) -> list:
        """grad_value * (a_g sign(w) + b_g w) per local shard, in its dtype (autograd)."""
        grads = [torch.zeros_like(w) for w in locals_]
        if not self.live:
            return grads
        if self.name == "torch":
            return [g.to(w.dtype) for g, w in zip(self._oracle_grads(coefs, grad_value), locals_)]
        from fastsparse import ops

        used, weights, specs = self._fused_args([w.detach() for w in locals_])
        computed = ops.penalty_gradients(
            weights, self._live_rows(coefs), grad_value, specs, self.name
        )
        for ti, g in zip(used, computed):
            grads[ti] = g
        return grads

    def _oracle_grads(self, coefs, scale) -> list:
        """The gradient of sum_g a_g s1_g + b_g s2_g / 2 (coefs fixed): a_g sign(w) + b_g w."""
        leaves = [w.detach().requires_grad_(True) for w in self.locals]
        with torch.enable_grad():
            surrogate = torch.zeros((), dtype=self.acc, device=self._device())
            for k, c in enumerate(torch.split(coefs, self.counts)):
                if k in self.live:
                    ti, g = self.specs[k]
                    s1, s2 = reference.group_stats(leaves[ti], g)
                    c = c.to(s1.dtype)
                    surrogate = surrogate + (c[:, 0] * s1 + 0.5 * c[:, 1] * s2).sum().to(self.acc)
            grads = torch.autograd.grad(surrogate * scale, leaves, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for w, g in zip(self.locals, grads)]

    def add_grads_(self, grads, strength) -> torch.Tensor:
        """grads[i] += strength * dR/dW_i on the local shards; returns the value."""
        with torch.no_grad():
            fast = self.local_fast_path(grads, strength)
            if fast is not None:
                return fast
            value, coefs = self.value_and_coefs()
            if self.name == "torch":
                for g, update in zip(grads, self._oracle_grads(coefs, 1.0)):
                    g.add_(update.to(g.dtype), alpha=strength)
                return value
            if not self.live:
                return value
            from fastsparse import ops

            used, weights, specs = self._fused_args(self.locals)
            _into_like_weights(
                weights,
                [grads[ti] for ti in used],
                lambda ws, gs: ops.call(
                    ops.add_coefficient_grad_op,
                    gs,
                    ws,
                    self._live_rows(coefs),
                    specs,
                    strength,
                    self.name,
                ),
            )
            return value

    def local_fast_path(self, grads, strength):
        return None


class _Grouped(_Sharded):
    """DTensors x groupings: segment (ti, g) for every tensor ti and grouping g."""

    def __init__(self, tensors, groupings, kind, alpha, backend):
        specs = [(ti, g) for ti in range(len(tensors)) for g in groupings]
        super().__init__(tensors, specs, kind, alpha, backend)
        self.groupings = groupings
        self.roles = [_roles(self.placements[ti], self.mesh, g) for ti, g in specs]

    def _all_local(self) -> Optional[tuple]:
        """The mesh dims to sum the value over if no group spans ranks and all pairs share them
        (FSDP2 with "filters"): then the engine's one-pass ops run on the local shards."""
        if self.name == "torch" or self.kind in ACROSS_GROUP_KINDS:
            return None
        spreads = {spread for span, spread in self.roles if not span}
        if len(spreads) != 1 or any(span for span, _ in self.roles):
            return None
        return spreads.pop()

    def value_and_coefs(self):
        spread = self._all_local()
        if spread is None:
            return super().value_and_coefs()
        from fastsparse import ops

        coefs = torch.zeros(sum(self.counts), 2, dtype=self.acc, device=self._device())
        value = torch.zeros((), dtype=self.acc, device=self._device())
        if self.live:
            _, weights, specs = self._fused_args(self.locals)
            value, live_coefs = ops.call(
                ops.penalty_op, weights, self.kind, specs, self.alpha, self.name
            )
            _scatter_live_rows(coefs, live_coefs, self.counts, self.live)
        value = value.to(self.acc).clone()
        _all_reduce([(value, spread)], self.mesh)
        return value, coefs

    def local_fast_path(self, grads, strength):
        spread = self._all_local()
        if spread is None:
            return None
        from fastsparse import ops

        value = torch.zeros((), dtype=self.acc, device=self._device())
        if self.live:
            used, weights, specs = self._fused_args(self.locals)
            value = _into_like_weights(
                weights,
                [grads[ti] for ti in used],
                lambda ws, gs: ops.call(
                    ops.add_penalty_grad_op,
                    gs,
                    ws,
                    self.kind,
                    specs,
                    self.alpha,
                    strength,
                    self.name,
                ),
            )
        value = value.to(self.acc).clone()
        _all_reduce([(value, spread)], self.mesh)
        return value

    def complete_stats(self, stats: list) -> list:
        """Statistics of the groups that span ranks summed over the ranks (group_norms)."""
        _all_reduce([(s, span) for s, (span, _) in zip(stats, self.roles) if span], self.mesh)
        return stats

    def per_group(self, values: list) -> list:
        """Per-segment values [local groups] (one grouping) as DTensors [groups]: sharded like
        the groups where each rank holds whole groups, else replicated ("kernels" groups of
        sharded kernels are gathered: [O * C] is not split like [O, C])."""
        mesh, out = self.mesh, []
        replicated = [Replicate()] * mesh.ndim
        for (ti, grouping), v, (_, spread) in zip(self.specs, values, self.roles):
            t, local = self.tensors[ti], self.locals[ti]
            if grouping == "kernels" and spread:
                placements = [
                    self.placements[ti][m] if m in spread else Replicate() for m in range(mesh.ndim)
                ]
                grid = DTensor.from_local(
                    v.reshape(local.shape[:2]),
                    mesh,
                    placements,
                    shape=t.shape[:2],
                    stride=(t.shape[1], 1),
                )
                out.append(DTensor.from_local(_gather(grid).reshape(-1), mesh, replicated))
                continue
            placements = [Shard(0) if m in spread else Replicate() for m in range(mesh.ndim)]
            shape = (group_count(t.shape, grouping),)
            out.append(DTensor.from_local(v, mesh, placements, shape=shape, stride=(1,)))
        return out

    def complete(self, stats: list):
        """(value, coefs) from local statistics: the partial sums that cross shards are added.

        Per segment, `sums` = (sum of group values, L, F^2) over its groups: partial on a rank
        whose shard holds some of the groups (spread), complete otherwise.
        """
        kind, alpha = self.kind, self.alpha
        sums = [None] * len(stats)
        items = []
        for k, (span, spread) in enumerate(self.roles):
            if span:
                items.append((stats[k], span))
            elif spread:
                sums[k] = _segment_sums(stats[k], kind, alpha)
                items.append((sums[k], spread))
        _all_reduce(items, self.mesh)  # one all-reduce per mesh dim
        late = [k for k, (span, spread) in enumerate(self.roles) if span and spread]
        for k in late:
            sums[k] = _segment_sums(stats[k], kind, alpha)
        _all_reduce([(sums[k], self.roles[k][1]) for k in late], self.mesh)
        value = torch.zeros((), dtype=self.acc, device=self._device())
        coefs = []
        for k, s in enumerate(stats):
            totals = sums[k] if sums[k] is not None else _segment_sums(s, kind, alpha)
            coefs.append(reference.group_coefficients(s, kind, alpha, totals)[1])
            value = value + (
                _across_value(totals, kind) if kind in ACROSS_GROUP_KINDS else totals[0]
            )
        return value, torch.cat(coefs)


class _Coupled(_Sharded):
    """Coupled groups of DTensor parameters: segment = one member's slices on the local shard.

    `slice_groups` maps every local slice to its coupled group (-1: in none), `counted` says
    whether this rank's copy of the slice counts in the sums (not a replica on a mesh dim where
    another rank holds the same elements).
    """

    def __init__(self, coupled, kind, alpha, backend):
        params, index_of = [], {}
        for cg in coupled:
            for m in cg.members:
                if id(m.param) not in index_of:
                    index_of[id(m.param)] = len(params)
                    params.append(m.param)
        mesh = _common_mesh(params)
        placements = [_placements(p, mesh) for p in params]
        # The local layout depends on the groups, the parameters' placements and shapes only:
        # cached until the groups are freed.
        key = (
            tuple((id(cg), tuple(id(m.param) for m in cg.members)) for cg in coupled),
            tuple(tuple(pl) for pl in placements),
            tuple(tuple(p.shape) for p in params),
        )
        cached = _SHARDED_LAYOUTS.get(coupled[0])
        if cached is None or cached[0] != key:
            cached = (key, _coupled_local_layout(coupled, params, index_of, placements, mesh))
            _SHARDED_LAYOUTS[coupled[0]] = cached
        specs, slice_groups, counted, self.reduce_dims = cached[1]
        super().__init__(params, specs, kind, alpha, backend)
        self.slice_groups = slice_groups.to(self._device())
        self.counted = counted.to(self._device())
        self.group_counts = [cg.num_groups for cg in coupled]

    def per_group(self, values: list) -> list:
        """Per CoupledGroup values [G] (complete on every rank) as replicated DTensors."""
        replicated = [Replicate()] * self.mesh.ndim
        return [DTensor.from_local(v, self.mesh, replicated) for v in values]

    def _member_slices(self):
        """(tensor index, dim, group id of each local slice along dim) per member."""
        ids = torch.split(self.slice_groups, self.counts)
        return [(ti, 0 if g == "filters" else 1, i) for (ti, g), i in zip(self.specs, ids)]

    @staticmethod
    def _along(values, dim, ndim):
        return values.reshape(
            (-1,) + (1,) * (ndim - 1) if dim == 0 else (1, -1) + (1,) * (ndim - 2)
        )

    def covered(self) -> list:
        """Per local tensor, the bool mask of its elements in some coupled group."""
        masks = [torch.zeros_like(w, dtype=torch.bool) for w in self.locals]
        for ti, dim, ids in self._member_slices():
            masks[ti] |= self._along(ids >= 0, dim, masks[ti].dim())
        return masks

    def scale_groups_(self, factors: torch.Tensor) -> None:
        """Each local element times the factors of all its coupled groups, rounded once."""
        scales = [torch.ones_like(w, dtype=factors.dtype) for w in self.locals]
        for ti, dim, ids in self._member_slices():
            picked = torch.where(ids >= 0, factors.index_select(0, ids.clamp(min=0)), 1.0)
            scales[ti] *= self._along(picked, dim, scales[ti].dim())
        for w, scale in zip(self.locals, scales):
            w.copy_(w.to(scale.dtype) * scale)

    def group_stats(self, stats: list) -> torch.Tensor:
        """[coupled groups, 2]: the slices' statistics added per group, then over ranks."""
        slices = torch.cat(stats) * self.counted[:, None]
        covered = self.slice_groups >= 0
        out = torch.zeros(sum(self.group_counts), 2, dtype=self.acc, device=self._device())
        out.index_add_(0, self.slice_groups[covered], slices[covered])
        _all_reduce([(out, self.reduce_dims)], self.mesh)
        return out

    def complete(self, stats: list):
        group_stats = self.group_stats(stats)
        value = torch.zeros((), dtype=self.acc, device=self._device())
        coefs = []
        for s in torch.split(group_stats, self.group_counts):  # one set = one "tensor"
            totals = _segment_sums(s, self.kind, self.alpha)
            values, c = reference.group_coefficients(s, self.kind, self.alpha, totals)
            value = value + values.sum()
            coefs.append(c)
        coefs = torch.cat(coefs) if coefs else group_stats
        covered = self.slice_groups >= 0
        picked = coefs.index_select(0, torch.where(covered, self.slice_groups, 0))
        return value, torch.where(covered[:, None], picked, 0.0)


def _coupled_local_layout(coupled, params, index_of, placements, mesh):
    """(specs, slice_groups, counted, reduce_dims) of coupled groups on this rank's shards.

    One spec (parameter, "filters" or "channels") per member; slice_groups [local slices] holds
    the coupled group of each local slice (-1: none); counted [local slices] is False for the
    slices of a parameter replicated on a summed mesh dim, except on coordinate 0 there (one
    copy counts); reduce_dims are the mesh dims that shard some parameter.
    """
    reduce_dims = tuple(
        d
        for d in range(mesh.ndim)
        if mesh.size(d) > 1 and any(pl[d].is_shard() for pl in placements)
    )
    coordinate = mesh.get_coordinate()
    specs, slice_groups, counted, offset = [], [], [], 0
    for cg in coupled:
        for m in cg.members:
            pi = index_of[id(m.param)]
            if m.dim not in GROUPING_OF_DIM:
                raise ValueError(f"coupled group {cg.root!r}: {m.name} is sliced along dim {m.dim}")
            lo, size = _local_range(m.param, placements[pi], mesh, m.dim)
            index, group = m.index.cpu(), m.group.cpu()
            keep = (index >= lo) & (index < lo + size)
            ids = torch.full((size,), -1, dtype=torch.int64)
            ids[index[keep] - lo] = group[keep] + offset
            specs.append((pi, GROUPING_OF_DIM[m.dim]))
            slice_groups.append(ids)
            counts = all(coordinate[d] == 0 or placements[pi][d].is_shard() for d in reduce_dims)
            counted.append(torch.full((size,), counts))
        offset += cg.num_groups
    empty = torch.zeros(0, dtype=torch.int64)
    return (
        specs,
        torch.cat(slice_groups) if slice_groups else empty,
        torch.cat(counted) if counted else empty.bool(),
        reduce_dims,
    )


# --- sums over complete statistics (O(groups); the rule is the oracle's group_coefficients) ---


def _segment_sums(stats: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """[3] = (sum of the group values of a within-group kind, L, F^2) over the given groups."""
    s2 = stats[:, 1]
    total_l, total_f2 = torch.sqrt(s2).sum(), s2.sum()
    if kind in ACROSS_GROUP_KINDS:
        within = torch.zeros_like(total_l)
    else:
        within = reference.group_coefficients(stats, kind, alpha, None)[0].sum()
    return torch.stack([within, total_l, total_f2])


def _across_value(totals: torch.Tensor, kind: str) -> torch.Tensor:
    """L / F (group_l1l2) or L^2 / F^2 (group_hoyer_square); 0 when F = 0."""
    total_l, total_f2 = totals[1], totals[2]
    inv_f2 = torch.where(total_f2 > 0, 1.0 / torch.where(total_f2 > 0, total_f2, 1.0), 0.0)
    return total_l * torch.sqrt(inv_f2) if kind == "group_l1l2" else total_l**2 * inv_f2


# --- placements and communication -----------------------------------------------------------


def _common_mesh(tensors):
    """The device mesh of the DTensors among `tensors` (one mesh for all)."""
    meshes = []
    for t in tensors:
        if isinstance(t, DTensor) and t.device_mesh not in meshes:
            meshes.append(t.device_mesh)
    if len(meshes) != 1:
        raise ValueError("all DTensors of one call must live on the same device mesh")
    return meshes[0]


def _placements(t, mesh) -> list:
    """A DTensor's placements; a plain tensor counts as replicated (the same on every rank), as
    are the unsharded parameters FSDP2 leaves on the root module between forward and backward
    (their gradient then goes through FSDP2's reduce-scatter, which averages equal values)."""
    return list(t.placements) if isinstance(t, DTensor) else [Replicate()] * mesh.ndim


def _local(t) -> torch.Tensor:
    """The rank's local shard (differentiable: its gradient flows back to the DTensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _roles(placements, mesh, grouping) -> tuple[tuple, tuple]:
    """(span, spread): the mesh dims whose shards split this grouping's groups between ranks,
    and those whose shards hold different whole groups. Other mesh dims need nothing."""
    span, spread = [], []
    for d, p in enumerate(placements):
        if mesh.size(d) == 1 or p.is_replicate():
            continue
        if type(p) is not Shard or p.dim < 0:
            raise NotImplementedError(
                f"placement {p} is not supported; parameters must be Shard(d) or Replicate "
                "(redistribute a Partial tensor first)"
            )
        (spread if p.dim in GROUP_DIMS[grouping] else span).append(d)
    return tuple(span), tuple(spread)


def _local_range(t, placements, mesh, dim: int) -> tuple[int, int]:
    """(global index of the first local slice along dim, local size along dim)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in placements:
        if not (p.is_replicate() or type(p) is Shard):
            raise NotImplementedError(f"placement {p} is not supported in coupled groups")
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    return offset[dim], shape[dim]


def _all_reduce(items, mesh) -> None:
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


def _gather(t: DTensor) -> torch.Tensor:
    """The full tensor of a DTensor on every rank (bool through uint8: gloo has no bool)."""
    if t.dtype == torch.bool:
        return t.to(torch.uint8).full_tensor().to(torch.bool)
    return t.full_tensor()


def _local_grads(tensors) -> list:
    """The local shards of the DTensors' gradients (allocated as zeros when missing)."""
    grads = []
    for i, t in enumerate(tensors):
        if t.grad is None:
            t.grad = torch.zeros_like(t, dtype=grad_dtype(t))
        g = t.grad
        if not isinstance(t, DTensor):
            grads.append(g)
            continue
        if not isinstance(g, DTensor) or tuple(g.placements) != tuple(t.placements):
            where = g.placements if isinstance(g, DTensor) else "a plain tensor"
            raise ValueError(
                f"tensors[{i}].grad is {where}; expected a DTensor placed like its parameter "
                f"({t.placements})"
            )
        grads.append(g.to_local())
    return grads


def _into_like_weights(weights, grads, run):
    """run(weights, grads) with every gradient laid out like its weight (a buffer otherwise,
    added afterwards): the kernels write a gradient with its weight's strides."""
    targets, spills = [], []
    for w, g in zip(weights, grads):
        if g.stride() != w.stride():
            spill = torch.zeros_like(w, dtype=g.dtype)
            spills.append((g, spill))
            g = spill
        targets.append(g)
    result = run(weights, targets)
    for g, spill in spills:
        g.add_(spill)
    return result


def _scatter_live_rows(out, live_rows, counts, live) -> None:
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    start = 0
    for k in live:
        out[offsets[k] : offsets[k + 1]] = live_rows[start : start + counts[k]]
        start += counts[k]
