"""The engine: every fused op composed from a backend's few primitives.

A backend (the Triton kernels of fastsparse.backends.triton, the C++ kernels of
fastsparse.backends.native) implements the `Backend` protocol of fastsparse/backends/__init__.py.
`select` = (pass index, split) picks segments (None: any). This module holds what is the same
for every backend: which segments take the one-pass path, the order of passes, the fp32 buffers
of multi-pass gradients, coupled groups that span tensors, and the masks of prox steps.
Everything here runs on the device without host synchronization.
"""

from __future__ import annotations

import torch

from fastsparse.backends import Backend
from fastsparse.core.contract import (
    ACROSS_GROUP_KINDS,
    COEFFICIENT_DTYPE,
    GROUP_PROX_KINDS,
    StepOptions,
    accumulation_dtype,
    accumulation_dtype_of,
)
from fastsparse.core.layout import (
    ALL,
    FlatLayout,
    Select,
    flat_layout,
    flat_views,
    new_empty,
    passes,
    segment_of_group_map,
    segment_sums,
)


def _plan_rule(backend: Backend, plan, stats, kind, alpha):
    sums = segment_sums(plan, stats) if kind in ACROSS_GROUP_KINDS else stats
    return backend.rule(stats, segment_of_group_map(plan), sums, kind, alpha)


# --- penalties over tensors x groupings (or explicit specs) ------------------------------------


def penalty_forward(backend: Backend, tensors, kind, specs, alpha):
    """Value (0-dim, accumulation dtype) and per-group coefficients for the backward."""
    plan = backend.plans.get(tensors, specs)
    values, coefs = _plan_rule(backend, plan, backend.stats(plan, tensors, ALL), kind, alpha)
    return values.sum().to(accumulation_dtype_of(tensors)), coefs.to(COEFFICIENT_DTYPE)


def backward_layout(tensors, specs) -> FlatLayout:
    """Where `penalty_backward_flat` writes the gradients: side by side in one flat buffer per
    dtype, the weights' dtypes, or fp32 / fp64 when several passes add up (low-precision weights
    then sum in fp32, rounded once at the end, by `backward_gradients`)."""
    dtypes = [t.dtype for t in tensors]
    if any(pass_index > 0 for _, _, pass_index in specs):
        dtypes = [accumulation_dtype(d) for d in dtypes]
    return flat_layout(tensors, dtypes)


def penalty_backward_flat(backend: Backend, tensors, coefs, grad_value, specs) -> list:
    """The flat buffers of `backward_layout` holding grad_value * (a_g sign(w) + b_g w) for
    every tensor; `backward_gradients` gives the per-tensor gradients.

    Flat buffers, not one tensor per gradient: their tensors keep their distances wherever the
    buffers land, so the Triton kernels' gradient table (relative addresses) stays as it was
    and a backward uploads nothing, under a CUDA graph capture too."""
    layout = backward_layout(tensors, specs)
    device = tensors[0].device if tensors else torch.device("cpu")
    flats = [new_empty((n,), dtype=d, device=device) for d, n in zip(layout.dtypes, layout.sizes)]
    grads = flat_views(tensors, layout, flats)
    dtypes = [layout.dtypes[b] for b in layout.buffer]
    same = all(d == t.dtype for d, t in zip(dtypes, tensors))
    plan = backend.plans.get(tensors, specs, None if same else dtypes)  # the forward's plan
    for p in passes(plan):
        backend.apply(
            plan,
            tensors,
            grads,
            coefs,
            Select(p),
            accumulate=p > 0,
            scale=1.0,
            scale_tensor=grad_value,
        )
    return flats


def backward_gradients(tensors, flats, specs) -> list:
    """Per tensor, its gradient from `penalty_backward_flat`'s flat buffers: a view, in the tensor's
    dtype and layout (cast when several passes summed in fp32)."""
    grads = flat_views(tensors, backward_layout(tensors, specs), flats)
    return [g if g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, tensors)]


def add_penalty_grad(backend: Backend, grads, tensors, kind, specs, alpha, strength):
    """grads[i] += strength * dR/dW_i in place; returns the penalty value (0-dim)."""
    plan = backend.plans.get(tensors, specs, [g.dtype for g in grads])
    # Within-group kinds on groups that are not split: statistics, rule and gradient in one
    # program (fused). The others (across-group kinds, split groups) need statistics first.
    two_pass = Select(split=None if kind in ACROSS_GROUP_KINDS else True)
    if kind in ACROSS_GROUP_KINDS or any(c.split for c in plan.classes):
        values, coefs = _plan_rule(
            backend, plan, backend.stats(plan, tensors, two_pass), kind, alpha
        )
    else:
        values = new_empty((plan.total_groups,), dtype=torch.float64, device=plan.device)
        coefs = values
    for p in passes(plan):  # a tensor's gradient is never written by two passes at once
        backend.apply(
            plan,
            tensors,
            grads,
            coefs,
            two_pass._replace(pass_index=p),
            accumulate=True,
            scale=strength,
        )
        if kind not in ACROSS_GROUP_KINDS:
            backend.fused(
                plan, tensors, grads, Select(p, split=False), kind, alpha, strength, values
            )
    return values.sum().to(accumulation_dtype_of(tensors))


class PreparedAddPenaltyGrad:
    """add_penalty_grad over these very tensors, prepared once: `run(strength)` -> value.

    Within-group kinds on groups that are not split go straight to the backend's fused launches
    prepared for the tensors' addresses (`prepare_fused`): no plan or table lookup per call.
    Other calls run add_penalty_grad. The caller keeps the tensors alive, calls
    `prepare_grads(grads)` for new gradients of the same dtypes and layouts, and prepares anew
    when a weight's address or layout changes.
    """

    def __init__(self, backend: Backend, grads, tensors, kind, specs, alpha):
        self.backend, self.tensors, self.kind, self.specs, self.alpha = (
            backend, tensors, kind, specs, alpha,
        )  # fmt: skip
        self.plan = backend.plans.get(tensors, specs, [g.dtype for g in grads])
        split = any(c.split for c in self.plan.classes)
        self.fused = kind not in ACROSS_GROUP_KINDS and not split
        groups, device = self.plan.total_groups, self.plan.device
        self.values = new_empty((groups,), dtype=torch.float64, device=device)
        self.scale_vector = self.scale_value = None
        # .float() costs half of .to(torch.float32) on a 0-dim tensor
        fp64 = accumulation_dtype_of(tensors) == torch.float64
        self.cast = torch.Tensor.double if fp64 else torch.Tensor.float
        self.prepare_grads(grads)

    def prepare_grads(self, grads) -> None:
        """Prepare the launches for these gradients (same dtypes and layouts as before)."""
        self.grads = grads
        if self.fused:
            launches = (
                self.backend.prepare_fused(
                    self.plan, self.tensors, grads, Select(p, split=False), self.kind, self.alpha
                )
                for p in passes(self.plan)
            )
            self.launches = [launch for launch in launches if launch is not None]

    def run(self, strength: float, value_scale: float = 1.0) -> torch.Tensor:
        """Add strength * dR/dW to the gradients; returns value_scale * R (0-dim)."""
        if not self.fused:
            value = add_penalty_grad(
                self.backend, self.grads, self.tensors, self.kind, self.specs, self.alpha, strength
            )
            return value if value_scale == 1.0 else value.mul_(value_scale)
        values = self.values
        for launch in self.launches:  # in pass order: a gradient is written once per pass
            launch(strength, values)
        if value_scale == 1.0:
            return self.cast(values.sum())  # as add_penalty_grad, bitwise
        # One op for the scaled sum, in fp64: a dot with a vector of value_scale.
        if self.scale_vector is None or self.scale_value != value_scale:
            self.scale_vector = torch.full_like(values, value_scale)
            self.scale_value = value_scale
        return self.cast(torch.dot(values, self.scale_vector))


def group_norms(backend: Backend, tensors, specs):
    """The group l2 norms of all segments, concatenated in order (accumulation dtype)."""
    plan = backend.plans.get(tensors, specs)
    return torch.sqrt(backend.stats(plan, tensors, ALL)[:, 1]).to(accumulation_dtype_of(tensors))


# --- statistics and given coefficients: the pieces sharded tensors are built from -------------
# (fastsparse/distributed adds the statistics of a group's shards across ranks between them)


def group_stats(backend: Backend, tensors, specs):
    """(s1, s2) of every group of all segments, concatenated in order: [groups, 2] (acc dtype)."""
    plan = backend.plans.get(tensors, specs)
    return backend.stats(plan, tensors, ALL).to(accumulation_dtype_of(tensors))


def add_coefficient_grad(backend: Backend, grads, tensors, coefs, specs, strength):
    """grads[i] += strength * (a_g sign(w) + b_g w) with given coefs [groups, 2] = (a_g, b_g)."""
    plan = backend.plans.get(tensors, specs, [g.dtype for g in grads])
    for p in passes(plan):  # a tensor's gradient is never written by two passes at once
        backend.apply(plan, tensors, grads, coefs, Select(p), accumulate=True, scale=strength)


# --- coupled groups: groups made of slices of several tensors -----------------------------------
#
# A coupled plan's segments are slices (one spec per (tensor, dim) a coupled group touches);
# `slice_groups` [slices] maps each slice to its coupled group (-1: in none), `group_counts`
# [coupled sets] gives each set's number of groups (a set plays the part of one tensor for the
# across-group kinds).


def _coupled_maps(plan, slice_groups, group_counts):
    """Cached gather order: slices sorted by coupled group, and per-group slice counts."""
    key = ("coupled", slice_groups.data_ptr(), tuple(group_counts))
    if key not in plan.cache:
        total = sum(group_counts)
        groups = slice_groups.to(plan.device)
        covered = torch.nonzero(groups >= 0).flatten()
        order = covered[torch.argsort(groups[covered], stable=True)]
        per_group = torch.bincount(groups[covered], minlength=total)
        counts = torch.tensor(group_counts, dtype=torch.int64, device=plan.device)
        set_of_group = torch.repeat_interleave(
            torch.arange(len(group_counts), dtype=torch.int32, device=plan.device), counts
        )
        plan.cache[key] = (order, per_group, counts, set_of_group, groups)
    return plan.cache[key]


def _coupled_stats(plan, slice_stats, slice_groups, group_counts):
    """Per coupled group (s1, s2): the sum over its slices, added in a fixed order."""
    order, per_group, _, _, _ = _coupled_maps(plan, slice_groups, group_counts)
    gathered = slice_stats.index_select(0, order)
    return torch.stack(
        [
            torch.segment_reduce(gathered[:, i].contiguous(), "sum", lengths=per_group, unsafe=True)
            for i in range(2)
        ],
        dim=1,
    )


def _per_slice(values, slice_groups, fill):
    """values[group of slice] for every slice; `fill` for slices in no group."""
    covered = slice_groups >= 0
    picked = values.index_select(0, torch.where(covered, slice_groups, 0))
    shape = (-1,) + (1,) * (values.dim() - 1)
    return torch.where(covered.reshape(shape), picked, fill)


def _coupled_rule(backend: Backend, plan, tensors, slice_groups, group_counts, kind, alpha):
    stats = _coupled_stats(plan, backend.stats(plan, tensors, ALL), slice_groups, group_counts)
    _, _, counts, set_of_group, groups = _coupled_maps(plan, slice_groups, group_counts)
    sums = stats
    if kind in ACROSS_GROUP_KINDS:
        s2 = stats[:, 1].contiguous()
        sums = torch.stack(
            [
                torch.segment_reduce(torch.sqrt(s2), "sum", lengths=counts, unsafe=True),
                torch.segment_reduce(s2, "sum", lengths=counts, unsafe=True),
            ],
            dim=1,
        )
    values, coefs = backend.rule(stats, set_of_group, sums, kind, alpha)
    return values, _per_slice(coefs, groups, 0.0)


def coupled_penalty_forward(
    backend: Backend, tensors, specs, slice_groups, group_counts, kind, alpha
):
    """Value and per-slice coefficients of a penalty over coupled groups."""
    plan = backend.plans.get(tensors, specs)
    values, slice_coefs = _coupled_rule(
        backend, plan, tensors, slice_groups, group_counts, kind, alpha
    )
    acc = accumulation_dtype_of(tensors)
    return values.sum().to(acc), slice_coefs.to(COEFFICIENT_DTYPE)


def add_coupled_penalty_grad(
    backend: Backend, grads, tensors, specs, slice_groups, group_counts, kind, alpha, strength
):
    plan = backend.plans.get(tensors, specs, [g.dtype for g in grads])
    values, slice_coefs = _coupled_rule(
        backend, plan, tensors, slice_groups, group_counts, kind, alpha
    )
    for p in passes(plan):
        backend.apply(plan, tensors, grads, slice_coefs, Select(p), accumulate=True, scale=strength)
    return values.sum().to(accumulation_dtype_of(tensors))


def coupled_group_norms(backend: Backend, tensors, specs, slice_groups, group_counts):
    plan = backend.plans.get(tensors, specs)
    stats = _coupled_stats(plan, backend.stats(plan, tensors, ALL), slice_groups, group_counts)
    return torch.sqrt(stats[:, 1]).to(accumulation_dtype_of(tensors))


# --- proximal steps --------------------------------------------------------------------------


def prox_factors(norms: torch.Tensor, kind: str, threshold: float) -> torch.Tensor:
    """Per-group multipliers of the group prox kinds: 0 for dead groups (n <= t)."""
    alive = norms > threshold
    if kind == "group_l0":
        return alive.to(norms.dtype)
    return torch.where(alive, 1.0 - threshold / torch.where(alive, norms, 1.0), 0.0)


def prox_(backend: Backend, tensors, specs, kind, t_elem, t_group):
    """Threshold in place; returns the flat [groups] bool mask of groups with a nonzero left."""
    plan = backend.plans.get(tensors, specs)
    factors = None
    if kind in GROUP_PROX_KINDS and any(c.split for c in plan.classes):
        hard = t_elem if kind == "l0_group_lasso" else None
        stats = backend.stats(plan, tensors, Select(split=True), element_threshold=hard)
        factors = prox_factors(torch.sqrt(stats[:, 1]), kind, t_group)
    after = backend.prox(plan, tensors, ALL, kind, t_elem, t_group, factors)
    return after[:, 1] > 0


def coupled_prox_(backend: Backend, tensors, specs, slice_groups, group_counts, kind, threshold):
    """group_lasso / group_l0 on coupled groups, in place; returns kept [coupled groups].

    All norms come from the input (simultaneous); an element in several groups is multiplied by
    each group's factor, pass after pass.
    """
    plan = backend.plans.get(tensors, specs)
    stats = _coupled_stats(plan, backend.stats(plan, tensors, ALL), slice_groups, group_counts)
    factors = prox_factors(torch.sqrt(stats[:, 1]), kind, threshold)
    coupled_scale_groups_(backend, tensors, specs, slice_groups, group_counts, factors)
    return factors > 0


def scale_groups_(backend: Backend, tensors, specs, factors) -> None:
    """w_g *= factors[g] in place, every group of every tensor in one launch per class."""
    plan = backend.plans.get(tensors, specs)
    backend.prox(plan, tensors, ALL, "scale", 0.0, 0.0, factors)


def coupled_scale_groups_(backend: Backend, tensors, specs, slice_groups, group_counts, factors):
    """Every slice of a coupled group times the group's factor (slices in no group: 1)."""
    plan = backend.plans.get(tensors, specs)
    _, _, _, _, groups = _coupled_maps(plan, slice_groups, group_counts)
    slice_factors = _per_slice(factors, groups, 1.0)
    for p in passes(plan):
        backend.prox(plan, tensors, Select(p), "scale", 0.0, 0.0, slice_factors)


# --- an optimizer step fused with the prox -----------------------------------------------------


def step_prox_(
    backend: Backend, tensors, grads, states, specs, options: StepOptions, kind, t_elem, t_group
):
    """An optimizer step (`options`: `SGDStepOptions` as torch.optim.SGD, `AdamStepOptions` as
    Adam / AdamW; per tensor its state buffers) and the prox in one pass over each group; the
    flat kept mask [groups], or None where the backend has no such pass for these tensors
    (nothing is then modified)."""
    plan = backend.plans.get(tensors, specs)
    after = backend.step_prox(plan, tensors, grads, states, options, kind, t_elem, t_group)
    return None if after is None else after[:, 1] > 0
