"""The computation on local shards: each rank's group statistics, completed across ranks, then
the coefficient rule and the gradients of its own elements.

A penalty is determined by per-group statistics (s1, s2) = (sum |w|, sum w^2); the gradient of
an element of group g is a_g * sign(w) + b_g * w, where (a_g, b_g) follow from the group's
statistics (and, for the across-group kinds, from the per-tensor sums L = sum_g n_g and
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
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from fastsparse import ops, reference
from fastsparse.backends import resolve_backend
from fastsparse.core.checks import with_grads_like_weights
from fastsparse.core.contract import ACROSS_GROUP_KINDS, GROUPING_OF_DIM, accumulation_dtype_of
from fastsparse.core.layout import addressable, encode_specs, group_count
from fastsparse.distributed.mesh import (
    all_reduce_sum,
    common_mesh,
    full_tensor,
    local_range,
    local_shard,
    placements_of,
    shard_roles,
)

__all__ = ["CoupledProblem", "GroupedProblem", "ShardedPenalty", "ShardedProblem"]

# Coupled layouts of sharded parameters, cached per list of groups (keyed weakly by its first).
_SHARDED_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ShardedPenalty(torch.autograd.Function):
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


class ShardedProblem:
    """Local shards cut into segments (tensor index, grouping) as the engine cuts tensors.

    Subclasses say how segments map to groups across ranks (`complete`): plain groupings
    (GroupedProblem) or coupled groups (CoupledProblem). Attributes: tensors (the DTensors),
    locals (their local shards, detached), specs, mesh, kind, alpha, name (resolved backend),
    acc (dtype), device (of the local shards).
    """

    def __init__(self, tensors, specs, kind, alpha, backend):
        self.mesh = common_mesh(tensors)
        self.tensors = tensors
        self.placements = [placements_of(t, self.mesh) for t in tensors]
        self.locals = [local_shard(t).detach() for t in tensors]
        self.specs = specs
        self.kind, self.alpha = kind, alpha
        self.acc = accumulation_dtype_of(tensors)
        self.device = self.locals[0].device if self.locals else torch.device("cpu")
        self.name = resolve_backend(backend, self.device)
        # Segments on empty shards have no rows in the engine's plans: they are left out of
        # the fused calls (their statistics are 0, their gradients empty).
        self.live = [k for k, (ti, _) in enumerate(specs) if self.locals[ti].numel() > 0]
        self.counts = [group_count(self.locals[ti].shape, g) for ti, g in specs]

    def differentiable_locals(self) -> list:
        return [local_shard(t) for t in self.tensors]

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
        rows = [torch.zeros(c, 2, dtype=self.acc, device=self.device) for c in self.counts]
        if not self.live:
            return rows
        if self.name == "torch":
            for k in self.live:
                ti, g = self.specs[k]
                rows[k] = torch.stack(reference.group_stats(self.locals[ti], g), 1).to(self.acc)
            return rows
        _, weights, specs = self._fused_args(self.locals)
        flat = ops.call(ops.group_stats_op, weights, specs, self.name).to(self.acc)
        for k, piece in zip(self.live, torch.split(flat, [self.counts[k] for k in self.live])):
            rows[k] = piece
        return rows

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
            surrogate = torch.zeros((), dtype=self.acc, device=self.device)
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
            used, weights, specs = self._fused_args(self.locals)
            with_grads_like_weights(
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


class GroupedProblem(ShardedProblem):
    """DTensors x groupings: segment (ti, g) for every tensor ti and grouping g."""

    def __init__(self, tensors, groupings, kind, alpha, backend):
        specs = [(ti, g) for ti in range(len(tensors)) for g in groupings]
        super().__init__(tensors, specs, kind, alpha, backend)
        self.groupings = groupings
        self.roles = [shard_roles(self.placements[ti], self.mesh, g) for ti, g in specs]

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
        coefs = torch.zeros(sum(self.counts), 2, dtype=self.acc, device=self.device)
        value = torch.zeros((), dtype=self.acc, device=self.device)
        if self.live:
            _, weights, specs = self._fused_args(self.locals)
            value, live_coefs = ops.call(
                ops.penalty_op, weights, self.kind, specs, self.alpha, self.name
            )
            _scatter_live_rows(coefs, live_coefs, self.counts, self.live)
        value = value.to(self.acc).clone()
        all_reduce_sum([(value, spread)], self.mesh)
        return value, coefs

    def local_fast_path(self, grads, strength):
        spread = self._all_local()
        if spread is None:
            return None
        value = torch.zeros((), dtype=self.acc, device=self.device)
        if self.live:
            used, weights, specs = self._fused_args(self.locals)
            value = with_grads_like_weights(
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
        all_reduce_sum([(value, spread)], self.mesh)
        return value

    def complete_stats(self, stats: list) -> list:
        """Statistics of the groups that span ranks summed over the ranks (group_norms)."""
        all_reduce_sum([(s, span) for s, (span, _) in zip(stats, self.roles) if span], self.mesh)
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
                out.append(DTensor.from_local(full_tensor(grid).reshape(-1), mesh, replicated))
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
        all_reduce_sum(items, self.mesh)  # one all-reduce per mesh dim
        late = [k for k, (span, spread) in enumerate(self.roles) if span and spread]
        for k in late:
            sums[k] = _segment_sums(stats[k], kind, alpha)
        all_reduce_sum([(sums[k], self.roles[k][1]) for k in late], self.mesh)
        value = torch.zeros((), dtype=self.acc, device=self.device)
        coefs = []
        for k, s in enumerate(stats):
            totals = sums[k] if sums[k] is not None else _segment_sums(s, kind, alpha)
            coefs.append(reference.group_coefficients(s, kind, alpha, totals)[1])
            value = value + (
                _across_value(totals, kind) if kind in ACROSS_GROUP_KINDS else totals[0]
            )
        return value, torch.cat(coefs)


class CoupledProblem(ShardedProblem):
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
        mesh = common_mesh(params)
        placements = [placements_of(p, mesh) for p in params]
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
        self.slice_groups = slice_groups.to(self.device)
        self.counted = counted.to(self.device)
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
        out = torch.zeros(sum(self.group_counts), 2, dtype=self.acc, device=self.device)
        out.index_add_(0, self.slice_groups[covered], slices[covered])
        all_reduce_sum([(out, self.reduce_dims)], self.mesh)
        return out

    def complete(self, stats: list):
        group_stats = self.group_stats(stats)
        value = torch.zeros((), dtype=self.acc, device=self.device)
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
            lo, size = local_range(m.param, placements[pi], mesh, m.dim)
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


def _scatter_live_rows(out, live_rows, counts, live) -> None:
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    start = 0
    for k in live:
        out[offsets[k] : offsets[k + 1]] = live_rows[start : start + counts[k]]
        start += counts[k]
