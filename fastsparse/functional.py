"""The functional API: penalty, add_penalty_grad_, group_norms.

Each function validates its input completely before touching anything, resolves the backend,
and routes to the fused torch.library ops (fastsparse.ops) or to the oracle (backend "torch").
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Sequence, Union

import torch

from fastsparse import reference
from fastsparse.backends import resolve_backend
from fastsparse.coupled import as_coupled_list, coupled_layout
from fastsparse.layout import encode_groupings, group_count, is_dense, segment_geometry
from fastsparse.reference import GROUPINGS, KINDS, Grouping

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]

_MIN_DIMS = {"channels": 2, "kernels": 3}


def _as_list(tensors: Tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"expected a tensor or a sequence of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    return tensors


def _check_tensors(tensors: list[torch.Tensor]) -> None:
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(
                f"tensors[{i}] has dtype {t.dtype}; penalties need floating-point tensors"
            )
        if t.layout != torch.strided:
            raise TypeError(f"tensors[{i}] has layout {t.layout}; only dense tensors are supported")
    devices = {}
    for i, t in enumerate(tensors):
        devices.setdefault(t.device, i)
    if len(devices) > 1:
        where = ", ".join(f"{d} (tensors[{i}])" for d, i in devices.items())
        raise ValueError(f"all tensors must be on one device; got {where}")


def _check_groupings(groups: Grouping, tensors: list[torch.Tensor]) -> tuple:
    groupings = reference.as_groupings(groups)
    if not groupings:
        raise ValueError("groups is an empty sequence; give at least one grouping")
    valid = ", ".join(repr(g) for g in GROUPINGS)
    for g in groupings:
        if g not in GROUPINGS:
            raise ValueError(f"unknown grouping {g!r}; valid groupings: {valid} or a tuple of them")
        need = _MIN_DIMS.get(g)
        for i, t in enumerate(tensors):
            if need and t.dim() < need:
                raise ValueError(
                    f"grouping {g!r} needs tensors with at least {need} dims; "
                    f"tensors[{i}] has shape {tuple(t.shape)}"
                )
    return groupings


def _check_kind(kind: str, options: dict) -> float:
    """Validate kind and options; return alpha."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    unknown = set(options) - {"alpha"}
    if unknown:
        raise TypeError(
            f"unexpected option(s) {', '.join(sorted(unknown))}; the only option is alpha"
        )
    if "alpha" in options and kind != "sparse_group_lasso":
        raise ValueError(f"option alpha applies to kind 'sparse_group_lasso' only, not {kind!r}")
    alpha = options.get("alpha", 0.5)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def _check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"strength must be a Python number, got {type(strength).__name__}")
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"strength must be finite and >= 0, got {strength!r}")
    return float(strength)


def _prepare(tensors: Tensors, kind: str, groups: Grouping, options: dict):
    tensors = _as_list(tensors)
    _check_tensors(tensors)
    groupings = _check_groupings(groups, tensors)
    alpha = _check_kind(kind, options)
    return tensors, groupings, alpha


def _addressable(t: torch.Tensor, groupings) -> bool:
    """True if the fused kernels can address every grouping of t through its strides."""
    return all(segment_geometry(t, g) is not None for g in groupings)


def _output_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _zero_value(tensors: list[torch.Tensor]) -> torch.Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.zeros((), dtype=_output_dtype(tensors), device=device)


# --- [issue 7] DTensor inputs (FSDP2, tensor parallel) go to fastsparse/distributed.py --------


def _sharded(tensors) -> bool:
    """True if any of the tensors is a DTensor (only possible once torch imported DTensor)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(t, module.DTensor) for t in tensors)


def _distributed():
    from fastsparse import distributed

    return distributed


def grad_dtype(t: torch.Tensor) -> torch.dtype:
    """[issue 7] The dtype of t's gradient: t.grad_dtype when set (e.g. fp32 gradients of bf16
    parameters), else t's dtype."""
    return getattr(t, "grad_dtype", None) or t.dtype


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
        backend: "auto", "triton" or "torch"; "auto" honours FASTSPARSE_BACKEND.
        options: alpha (sparse_group_lasso only, default 0.5).

    Returns:
        A 0-dim fp32 tensor (fp64 if any input is fp64); gradients flow to every tensor in its
        own dtype.

    Example:
        >>> model = torch.nn.Conv2d(3, 8, 3)
        >>> loss = 1e-3 * penalty(model.weight, "l1l2")
        >>> loss.backward()
    """
    if reference.is_coupled(groups):
        coupled, alpha = _prepare_coupled(tensors, kind, groups, options)
        if _sharded(reference.coupled_params(coupled)):  # [issue 7]
            return _distributed().coupled_penalty(coupled, kind, alpha, backend)
        layout, name = _coupled_backend(coupled, backend)
        if name == "torch":
            return reference.coupled_penalty(coupled, kind, alpha)
        from fastsparse import ops

        value, _ = ops.coupled_penalty_op(
            layout.params,
            layout.slice_groups,
            layout.specs,
            layout.group_counts,
            kind,
            alpha,
            name,
        )
        return value
    tensors, groupings, alpha = _prepare(tensors, kind, groups, options)
    if _sharded(tensors):  # [issue 7]
        return _distributed().penalty(tensors, kind, groupings, alpha, backend)
    nonempty = [t for t in tensors if t.numel() > 0]
    if not nonempty:
        return _zero_value(tensors)
    name = resolve_backend(backend, nonempty[0].device)
    if name == "torch":
        return reference.penalty(nonempty, kind, groupings, alpha)
    from fastsparse import ops

    weights = [t if _addressable(t, groupings) else t.contiguous() for t in nonempty]
    value, _ = ops.penalty_op(weights, kind, encode_groupings(groupings), alpha, name)
    return value


def _prepare_coupled(tensors, kind: str, groups, options: dict):
    """Validate a call on coupled groups; returns (list of CoupledGroup, alpha)."""
    coupled = as_coupled_list(groups)
    check_coupled(coupled, tensors)
    return coupled, _check_kind(kind, options)


def check_coupled(coupled: list, tensors) -> None:
    """Coupled groups must have floating parameters on one device, all among `tensors` (if
    given: a check against groups traced on another copy of the model), and indices in range."""
    params = [m.param for cg in coupled for m in cg.members]
    _check_tensors(params)
    allowed = None
    if tensors is not None:
        if isinstance(tensors, torch.nn.Module):
            tensors = list(tensors.parameters())
        allowed = {id(t) for t in _as_list(tensors)}
    for cg in coupled:
        for m in cg.members:
            if allowed is not None and id(m.param) not in allowed:
                raise ValueError(
                    f"coupled group {cg.root!r}: parameter {m.name!r} is not among `tensors` "
                    "(were the groups traced on another copy of the model?)"
                )
            size = m.param.shape[m.dim]
            if m.index.numel() and (int(m.index.min()) < 0 or int(m.index.max()) >= size):
                raise ValueError(f"coupled group {cg.root!r}: index out of range for {m.name}")
            if m.group.numel() and (int(m.group.min()) < 0 or int(m.group.max()) >= cg.num_groups):
                raise ValueError(f"coupled group {cg.root!r}: group id out of range for {m.name}")


def _coupled_backend(coupled: list, backend):
    """(layout, backend name) for coupled groups; the oracle serves layouts the kernels cannot
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
    if reference.is_coupled(groups):
        coupled, alpha = _prepare_coupled(tensors, kind, groups, options)
        strength = _check_strength(strength)
        if _sharded(reference.coupled_params(coupled)):  # [issue 7]
            return _distributed().add_coupled_penalty_grad_(coupled, kind, strength, alpha, backend)
        layout, name = _coupled_backend(coupled, backend)
        _check_grads(layout.params)
        for t in layout.params:
            if t.grad is None:
                t.grad = torch.zeros_like(t, dtype=grad_dtype(t))
        with torch.no_grad():
            if name == "torch":
                value = reference.coupled_penalty(coupled, kind, alpha)
                updates = reference.coupled_penalty_grad(coupled, kind, alpha)
                for t, update in zip(reference.coupled_params(coupled), updates):
                    t.grad.add_(update.to(t.grad.dtype), alpha=strength)
                return value
            from fastsparse import ops

            return _with_grads_like_weights(
                layout.params,
                lambda weights, grads: ops.add_coupled_penalty_grad_op(
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
                addressable=lambda w: True,
            )
    tensors, groupings, alpha = _prepare(tensors, kind, groups, options)
    strength = _check_strength(strength)
    _check_grads(tensors)
    if _sharded(tensors):  # [issue 7]
        return _distributed().add_penalty_grad_(tensors, kind, strength, groupings, alpha, backend)
    nonempty = [t for t in tensors if t.numel() > 0]
    name = resolve_backend(backend, nonempty[0].device) if nonempty else "torch"
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t, dtype=grad_dtype(t))
    if not nonempty:
        return _zero_value(tensors)
    with torch.no_grad():
        if name == "torch":
            value = reference.penalty(nonempty, kind, groupings, alpha)
            updates = reference.penalty_grad(nonempty, kind, groupings, alpha)
            for t, update in zip(nonempty, updates):
                t.grad.add_(update.to(t.grad.dtype), alpha=strength)
            return value
        from fastsparse import ops

        return _with_grads_like_weights(
            nonempty,
            lambda weights, grads: ops.add_penalty_grad_op(
                grads, weights, kind, encode_groupings(groupings), alpha, strength, name
            ),
            addressable=lambda w: _addressable(w, groupings),
        )


def _check_grads(tensors: list[torch.Tensor]) -> None:
    """No tensor twice (one .grad updated twice in one launch would race), dense float grads."""
    first_index: dict[int, int] = {}
    for i, t in enumerate(tensors):
        j = first_index.setdefault(id(t), i)
        if j != i:  # one .grad updated twice in one launch would race
            raise ValueError(f"tensors[{i}] is the same tensor as tensors[{j}]")
        if t.grad is not None:
            g = t.grad
            if g.shape != t.shape or g.device != t.device or g.layout != torch.strided:
                raise ValueError(
                    f"tensors[{i}].grad has shape {tuple(g.shape)} on {g.device} ({g.layout}); "
                    f"expected a dense gradient of shape {tuple(t.shape)} on {t.device}"
                )
            if not g.is_floating_point():
                raise TypeError(f"tensors[{i}].grad has dtype {g.dtype}; expected floating point")


def _with_grads_like_weights(tensors, run, addressable):
    """Call run(weights, grads) with gradients laid out like their weights.

    The kernels write a gradient with its weight's strides; a weight the kernels cannot
    address goes as a contiguous copy, and a gradient of another layout through a buffer that
    is added to it afterwards.
    """
    weights, grads, spills = [], [], []
    for t in tensors:
        w = t.detach()
        if not addressable(w):
            w = w.contiguous()
        g = t.grad
        if g.stride() != w.stride():
            spill = torch.zeros_like(w, dtype=g.dtype)
            spills.append((g, spill))
            g = spill
        weights.append(w)
        grads.append(g)
    value = run(weights, grads)
    for target, spill in spills:
        target.add_(spill)
    return value


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
    if reference.is_coupled(groups):
        coupled = as_coupled_list(groups)
        check_coupled(coupled, tensors)
        if _sharded(reference.coupled_params(coupled)):  # [issue 7]
            return _distributed().coupled_group_norms(coupled, backend)
        layout, name = _coupled_backend(coupled, backend)
        if name == "torch":
            return reference.coupled_group_norms(coupled)
        from fastsparse import ops

        flat = ops.coupled_group_norms_op(
            [p.detach() for p in layout.params],
            layout.slice_groups,
            layout.specs,
            layout.group_counts,
            name,
        )
        return list(torch.split(flat, layout.group_counts))
    tensors = _as_list(tensors)
    _check_tensors(tensors)
    if isinstance(groups, (tuple, list)):
        raise ValueError("group_norms takes one grouping, not a tuple")
    (grouping,) = _check_groupings(groups, tensors)
    if _sharded(tensors):  # [issue 7]
        return _distributed().group_norms(tensors, grouping, backend)
    dtype = _output_dtype(tensors)
    nonempty = [t.detach() for t in tensors if t.numel() > 0]
    name = resolve_backend(backend, nonempty[0].device) if nonempty else "torch"
    if name == "torch":
        norms = iter(n.to(dtype) for n in reference.group_norms(nonempty, grouping))
    else:
        from fastsparse import ops

        weights = [t if _addressable(t, (grouping,)) else t.contiguous() for t in nonempty]
        flat = ops.group_norms_op(weights, encode_groupings((grouping,)), name)
        counts = [group_count(t.shape, grouping) for t in weights]
        norms = iter(torch.split(flat, counts))
    out = []
    for t in tensors:
        if t.numel() > 0:
            out.append(next(norms))
        else:
            out.append(torch.zeros(group_count(t.shape, grouping), dtype=dtype, device=t.device))
    return out
