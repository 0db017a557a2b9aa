"""The penalty op's public functions: penalty, add_penalty_grad_, group_norms.

Each function validates its input completely (fastsparse/core/checks.py) before touching
anything, then routes once: DTensors to fastsparse/distributed, the "torch" backend to the oracle
(fastsparse/reference/penalty.py), everything else to the fused torch.library ops
(fastsparse/ops.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastsparse import ops, reference
from fastsparse.backends import resolve_backend
from fastsparse.core.checks import (
    Tensors,
    allocate_missing_grads,
    as_tensor_list,
    check_coupled,
    check_grads,
    check_groupings,
    check_kind,
    check_strength,
    check_tensors,
    is_sharded,
    prepare,
    with_grads_like_weights,
)
from fastsparse.core.contract import Grouping, accumulation_dtype_of
from fastsparse.core.groups import as_coupled_list, coupled_layout, coupled_params, is_coupled
from fastsparse.core.layout import addressable, encode_groupings, group_count, is_dense


def _zero_value(tensors: list[torch.Tensor]) -> torch.Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.zeros((), dtype=accumulation_dtype_of(tensors), device=device)


def _distributed():
    # Imported only when a DTensor is seen: torch.distributed.tensor is heavy to import.
    from fastsparse import distributed

    return distributed


def penalty(
    tensors: Tensors,
    kind: str,
    *,
    groups: Grouping = "filters",
    backend: Optional[str] = "auto",
    **options,
) -> torch.Tensor:
    """The structured-sparsity penalty R summed over tensors (and groupings), differentiable.

    Args:
        tensors: one tensor or a sequence of tensors of any shapes, on one device.
        kind: one of fastsparse.KINDS ("l1", "l2", "group_lasso", "l1l2", "group_l1l2",
            "hoyer_square", "group_hoyer_square", "sparse_group_lasso").
        groups: "filters" (dim 0), "channels" (dim 1), "kernels" (dims 0 and 1), None (whole
            tensor), or a tuple of them (the penalty is summed over the groupings).
        backend: "auto", "triton", "native", "cuda" or "torch" (the oracle); "auto" honours
            FASTSPARSE_BACKEND (fastsparse/backends/__init__.py).
        options: alpha (sparse_group_lasso only, default 0.5).

    Returns:
        A 0-dim fp32 tensor (fp64 if any input is fp64); gradients flow to every tensor in its
        own dtype.

    Example:
        >>> model = torch.nn.Conv2d(3, 8, 3)
        >>> loss = 1e-3 * penalty(model.weight, "l1l2")
        >>> loss.backward()
    """
    if is_coupled(groups):
        coupled, alpha = _prepare_coupled(tensors, kind, groups, options)
        if is_sharded(coupled_params(coupled)):
            return _distributed().coupled_penalty(coupled, kind, alpha, backend)
        layout, name = coupled_backend(coupled, backend)
        if name == "torch":
            return reference.coupled_penalty(coupled, kind, alpha)
        value, _ = ops.call(
            ops.coupled_penalty_op,
            layout.params,
            layout.slice_groups,
            layout.specs,
            layout.group_counts,
            kind,
            alpha,
            name,
        )
        return value
    tensors, groupings, alpha = prepare(tensors, kind, groups, options)
    if is_sharded(tensors):
        return _distributed().penalty(tensors, kind, groupings, alpha, backend)
    nonempty = [t for t in tensors if t.numel() > 0]
    if not nonempty:
        return _zero_value(tensors)
    name = resolve_backend(backend, nonempty[0].device)
    if name == "torch":
        return reference.penalty(nonempty, kind, groupings, alpha)
    weights = [t if addressable(t, groupings) else t.contiguous() for t in nonempty]
    value, _ = ops.call(ops.penalty_op, weights, kind, encode_groupings(groupings), alpha, name)
    return value


def _prepare_coupled(tensors, kind: str, groups, options: dict):
    """Validate a call on coupled groups; returns (list of CoupledGroup, alpha)."""
    coupled = as_coupled_list(groups)
    check_coupled(coupled, tensors)
    return coupled, check_kind(kind, options)


def coupled_backend(coupled: list, backend):
    """(layout, backend name) for coupled groups (the prox op routes them the same way); the
    oracle serves layouts the kernels cannot
    address (a parameter that is not dense)."""
    layout = coupled_layout(coupled)
    if not layout.params:
        return layout, "torch"
    name = resolve_backend(backend, layout.params[0].device)
    if name != "torch" and not all(is_dense(p) for p in layout.params):
        name = "torch"
    return layout, name


def add_penalty_grad_(
    tensors: Tensors,
    kind: str,
    strength: float,
    *,
    groups: Grouping = "filters",
    backend: Optional[str] = "auto",
    **options,
) -> torch.Tensor:
    """Add strength * dR/dW to each tensor's .grad in place (allocating zeros if it is None).

    The fast path for large models: call it after loss.backward() and before optimizer.step(),
    like decoupled weight decay. It builds no autograd graph and does not synchronize with the
    device. The gradient may have another dtype than the weight (e.g. bf16 weights, fp32 grads).

    Returns:
        The penalty value R (not multiplied by strength) as a 0-dim tensor, as `penalty` gives.

    Example:
        >>> model = torch.nn.Linear(16, 4)
        >>> model(torch.randn(2, 16)).sum().backward()
        >>> value = add_penalty_grad_(model.weight, "group_lasso", 1e-4)
    """
    if is_coupled(groups):
        coupled, alpha = _prepare_coupled(tensors, kind, groups, options)
        strength = check_strength(strength)
        params = coupled_params(coupled)
        check_grads(params)
        if is_sharded(params):
            return _distributed().add_coupled_penalty_grad_(coupled, kind, strength, alpha, backend)
        layout, name = coupled_backend(coupled, backend)
        allocate_missing_grads(layout.params)
        with torch.no_grad():
            if name == "torch":
                value = reference.coupled_penalty(coupled, kind, alpha)
                updates = reference.coupled_penalty_grad(coupled, kind, alpha)
                for t, update in zip(coupled_params(coupled), updates):
                    t.grad.add_(update.to(t.grad.dtype), alpha=strength)
                return value
            return with_grads_like_weights(
                [p.detach() for p in layout.params],
                [p.grad for p in layout.params],
                lambda weights, grads: ops.call(
                    ops.add_coupled_penalty_grad_op,
                    grads,
                    weights,
                    layout.slice_groups,
                    layout.specs,
                    layout.group_counts,
                    kind,
                    alpha,
                    strength,
                    name,
                ),
            )
    tensors, groupings, alpha = prepare(tensors, kind, groups, options)
    strength = check_strength(strength)
    check_grads(tensors)
    if is_sharded(tensors):
        return _distributed().add_penalty_grad_(tensors, kind, strength, groupings, alpha, backend)
    nonempty = [t for t in tensors if t.numel() > 0]
    name = resolve_backend(backend, nonempty[0].device) if nonempty else "torch"
    allocate_missing_grads(tensors)
    if not nonempty:
        return _zero_value(tensors)
    with torch.no_grad():
        if name == "torch":
            value = reference.penalty(nonempty, kind, groupings, alpha)
            updates = reference.penalty_grad(nonempty, kind, groupings, alpha)
            for t, update in zip(nonempty, updates):
                t.grad.add_(update.to(t.grad.dtype), alpha=strength)
            return value
        detached = [t.detach() for t in nonempty]
        return with_grads_like_weights(
            [w if addressable(w, groupings) else w.contiguous() for w in detached],
            [t.grad for t in nonempty],
            lambda weights, grads: ops.call(
                ops.add_penalty_grad_op,
                grads,
                weights,
                kind,
                encode_groupings(groupings),
                alpha,
                strength,
                name,
            ),
        )


def _state(tensors) -> list:
    """What a prepared call checks per tensor: its address, shape and strides, which tensor its
    .grad is (the prepared gradients are kept alive, so an id is not reused) and where that
    gradient's memory is (p.grad.data = ... keeps the tensor, not its memory)."""
    return [
        (t.data_ptr(), t.shape, t.stride(), id(g := t.grad), g is not None and g.data_ptr())
        for t in tensors
    ]


class PreparedPenaltyGrad:
    """`add_penalty_grad_` over one fixed list of tensors, validated once, for a call per step.

    A call checks only what may change between steps: each tensor's address, shape and strides,
    which tensor its ``.grad`` is and that gradient's address. New gradients (after
    ``zero_grad(set_to_none=True)``) are validated and prepared in; a moved or reshaped weight
    prepares everything anew. With cached plans a call then costs a few times
    ``torch._foreach_add_`` over the same tensors (``python -m benchmarks.host_overhead``).
    `Regularizer.apply_` uses one.

    Args:
        tensors, kind, groups, backend, options: as in `add_penalty_grad_` (the backend is
            resolved when the tensors are prepared).

    Calls return what `add_penalty_grad_(tensors, kind, strength, ...)` returns, bitwise.
    Coupled groups, DTensors, empty tensors, the "torch" backend and gradients laid out unlike
    their weights take `add_penalty_grad_` itself, as do calls under torch.compile.

    Example:
        >>> model = torch.nn.Linear(16, 4)
        >>> step = PreparedPenaltyGrad([model.weight], "group_lasso")
        >>> model(torch.randn(2, 16)).sum().backward()
        >>> value = step(1e-4)
    """

    def __init__(
        self,
        tensors: Tensors,
        kind: str,
        *,
        groups: Grouping = "filters",
        backend: Optional[str] = "auto",
        **options,
    ):
        if is_coupled(groups):
            raise ValueError("PreparedPenaltyGrad takes tensors and groupings, not coupled groups")
        self.tensors, self.groupings, self.alpha = prepare(tensors, kind, groups, options)
        check_grads(self.tensors)
        self.kind, self.groups, self.backend, self.options = kind, groups, backend, options
        tensors = self.tensors
        self._general = not tensors or is_sharded(tensors) or any(t.numel() == 0 for t in tensors)
        self._prepared = self._state = None

    def __call__(self, strength: float, *, value_scale: float = 1.0) -> torch.Tensor:
        """Add strength * dR/dW to each tensor's .grad; returns value_scale * R (0-dim, as
        `add_penalty_grad_`; with value_scale 1 the same value bitwise)."""
        if self._general or torch.compiler.is_compiling():
            return self._general_call(strength, value_scale)
        strength = check_strength(strength)
        try:
            state = _state(self.tensors)
        except RuntimeError:  # a gradient without memory (sparse): say what is wrong with it
            check_grads(self.tensors)
            raise
        if state != self._state:
            self._update(state)
        if self._prepared is None:
            return self._general_call(strength, value_scale)
        return self._prepared.run(strength, value_scale)

    def _general_call(self, strength, value_scale: float) -> torch.Tensor:
        value = add_penalty_grad_(
            self.tensors, self.kind, strength, groups=self.groups, backend=self.backend,
            **self.options,
        )  # fmt: skip
        return value if value_scale == 1.0 else value.mul_(value_scale)

    def _update(self, state) -> None:
        """Prepare anew for a moved or re-laid-out weight, else prepare the new gradients."""
        if (
            self._state is None
            or self._prepared is None
            or any(new[:3] != old[:3] for new, old in zip(state, self._state))
        ):
            self._prepare()
        else:
            self._prepare_grads()
        if any(entry[4] is False for entry in state):  # with the gradients _grads() made
            state = _state(self.tensors)
        self._state = state

    def _prepare(self) -> None:
        """Prepare for the tensors as they are now, or leave them to add_penalty_grad_ (None)."""
        tensors = self.tensors
        self._prepared = None
        name = resolve_backend(self.backend, tensors[0].device)
        grads = self._grads()
        if name == "torch" or not all(
            addressable(t, self.groupings) and g.stride() == t.stride()
            for t, g in zip(tensors, grads)
        ):
            return
        weights = [t.detach() for t in tensors]
        groupings = encode_groupings(self.groupings)
        self._prepared = ops.prepare_add_penalty_grad(
            grads, weights, self.kind, groupings, self.alpha, name
        )

    def _prepare_grads(self) -> None:
        grads = self._grads()
        same = all(
            g.dtype == old.dtype and g.stride() == t.stride()
            for t, g, old in zip(self.tensors, grads, self._prepared.grads)
        )
        if same:
            self._prepared.prepare_grads(grads)
        else:
            self._prepare()

    def _grads(self) -> list:
        """The tensors' gradients, validated; zeros where one is None (as add_penalty_grad_)."""
        check_grads(self.tensors)
        allocate_missing_grads(self.tensors)
        return [t.grad for t in self.tensors]


def group_norms(
    tensors: Optional[Tensors], *, groups="filters", backend: Optional[str] = "auto"
) -> list[torch.Tensor]:
    """Per tensor, the 1-D tensor of its group l2 norms, in one fused pass.

    Returns a list with one tensor of shape [number of groups] per input tensor, in the
    accumulation dtype (fp32; fp64 if an input is fp64). Not differentiable. With coupled
    groups (`fastsparse.coupled_groups`), one [G] tensor per CoupledGroup; `tensors` may then
    be None.

    Example:
        >>> [n.shape for n in group_norms([torch.randn(8, 3, 3, 3), torch.randn(8)])]
        [torch.Size([8]), torch.Size([8])]
    """
    if is_coupled(groups):
        coupled = as_coupled_list(groups)
        check_coupled(coupled, tensors)
        if is_sharded(coupled_params(coupled)):
            return _distributed().coupled_group_norms(coupled, backend)
        layout, name = coupled_backend(coupled, backend)
        if name == "torch":
            return reference.coupled_group_norms(coupled)
        flat = ops.call(
            ops.coupled_group_norms_op,
            [p.detach() for p in layout.params],
            layout.slice_groups,
            layout.specs,
            layout.group_counts,
            name,
        )
        return list(torch.split(flat, layout.group_counts))
    tensors = as_tensor_list(tensors)
    check_tensors(tensors)
    (grouping,) = check_groupings(groups, tensors, single="group_norms")
    if is_sharded(tensors):
        return _distributed().group_norms(tensors, grouping, backend)
    dtype = accumulation_dtype_of(tensors)
    nonempty = [t.detach() for t in tensors if t.numel() > 0]
    name = resolve_backend(backend, nonempty[0].device) if nonempty else "torch"
    if name == "torch":
        norms = iter(n.to(dtype) for n in reference.group_norms(nonempty, grouping))
    else:
        weights = [t if addressable(t, (grouping,)) else t.contiguous() for t in nonempty]
        flat = ops.call(ops.group_norms_op, weights, encode_groupings((grouping,)), name)
        counts = [group_count(t.shape, grouping) for t in weights]
        norms = iter(torch.split(flat, counts))
    out = []
    for t in tensors:
        if t.numel() > 0:
            out.append(next(norms))
        else:
            out.append(torch.zeros(group_count(t.shape, grouping), dtype=dtype, device=t.device))
    return out
