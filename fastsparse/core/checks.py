"""Every validator of the public API, in one place: a call is checked completely before anything
is computed or written, so a bad call leaves every tensor unchanged. What passed here is trusted
below: fastsparse/distributed, the engine and the ops do not check it again.

One validator per concept: the tensor list (`as_tensor_list`, `check_tensors`, `check_distinct`),
groupings, kind and options, real scalars, coupled groups, gradients of in-place calls, prox
kinds and thresholds. Also the two steps every in-place gradient call takes once its gradients
are checked: `allocate_missing_grads` and `with_grads_like_weights`.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Callable, Optional, Sequence, Union

import torch

from fastsparse.core.contract import (
    GROUPING_OF_DIM,
    GROUPINGS,
    KINDS,
    MIN_DIMS,
    PROX_KINDS,
    Grouping,
    as_groupings,
    grad_dtype,
)

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


# --- tensors -------------------------------------------------------------------------------------


def as_tensor_list(
    tensors, *, name: str = "tensors", module_params: bool = False
) -> list[torch.Tensor]:
    """`tensors` as a list: one tensor, or an iterable of tensors (with `module_params`, also an
    ``nn.Module``: its parameters). `name` is the argument's name in the messages.

    >>> len(as_tensor_list([torch.ones(2), torch.ones(3)]))
    2
    """
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if tensors is None:
        raise ValueError(f"{name} is None; expected a tensor or a sequence of tensors")
    if module_params and isinstance(tensors, torch.nn.Module):
        return list(tensors.parameters())
    if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"expected a tensor or a sequence of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a tensor")
    return tensors


def check_tensors(tensors: list[torch.Tensor], *, name: str = "tensors") -> None:
    """Floating, dense (strided) tensors on one device; DTensors all on one device mesh, placed
    as fastsparse/distributed can complete their statistics (Shard(d) or Replicate)."""
    for i, t in enumerate(tensors):
        if not t.is_floating_point():
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected a floating-point tensor")
        if t.layout != torch.strided:
            raise TypeError(f"{name}[{i}] has layout {t.layout}; only dense tensors are supported")
    devices = {}
    for i, t in enumerate(tensors):
        devices.setdefault(t.device, i)
    if len(devices) > 1:
        where = ", ".join(f"{d} ({name}[{i}])" for d, i in devices.items())
        raise ValueError(f"all {name} must be on one device; got {where}")
    _check_placements(tensors, name)


def _check_placements(tensors: list[torch.Tensor], name: str) -> None:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor before torch imported it
    if module is None:
        return
    meshes = []
    for i, t in enumerate(tensors):
        if not isinstance(t, module.DTensor):
            continue
        mesh = t.device_mesh
        if mesh not in meshes:
            meshes.append(mesh)
        for d, p in enumerate(t.placements):
            # A mesh dim of size 1 splits nothing, whatever its placement says.
            if mesh.size(d) > 1 and not (
                p.is_replicate() or (type(p) is module.Shard and p.dim >= 0)
            ):
                raise NotImplementedError(
                    f"{name}[{i}] has placement {p} on mesh dim {d}; DTensors must be Shard(d) or "
                    "Replicate (redistribute a Partial tensor first)"
                )
    if len(meshes) > 1:
        raise ValueError("all DTensors of one call must live on the same device mesh")


def check_distinct(tensors: list[torch.Tensor], *, name: str = "tensors") -> None:
    """No tensor twice (an in-place call would update its .grad twice in one launch: a race)."""
    first_index: dict[int, int] = {}
    for i, t in enumerate(tensors):
        j = first_index.setdefault(id(t), i)
        if j != i:
            raise ValueError(f"{name}[{i}] is the same tensor as {name}[{j}]")


def is_sharded(tensors) -> bool:
    """True if any of the tensors is a DTensor (only possible once torch imported DTensor)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(t, module.DTensor) for t in tensors)


# --- groupings, kinds, scalars -------------------------------------------------------------------


def check_groupings(
    groups: Grouping, tensors: list[torch.Tensor], *, single: Optional[str] = None
) -> tuple:
    """The groupings of `groups` as a tuple, each known and within every tensor's dims.

    `single`: the calling function's name when it takes one grouping (a tuple is refused).

    >>> check_groupings(("filters", None), [torch.ones(4, 3)])
    ('filters', None)
    """
    valid = ", ".join(map(repr, GROUPINGS))
    if single is not None and isinstance(groups, (tuple, list)):
        raise ValueError(
            f"{single} takes one grouping, not a tuple of groupings ({groups!r}); valid "
            f"groupings: {valid} or coupled groups"
        )
    groupings = as_groupings(groups)
    if not groupings:
        raise ValueError("groups is an empty sequence; give at least one grouping")
    others = "coupled groups" if single is not None else "a tuple of them or coupled groups"
    for g in groupings:
        if g not in GROUPINGS:
            raise ValueError(f"unknown grouping {g!r}; valid groupings: {valid} or {others}")
        need = MIN_DIMS[g]
        for i, t in enumerate(tensors):
            if t.dim() < need:
                raise ValueError(
                    f"grouping {g!r} needs tensors with at least {need} dims; "
                    f"tensors[{i}] has shape {tuple(t.shape)}"
                )
    return groupings


def check_kind(kind: str, options: dict) -> float:
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


def check_real(name: str, value, low: float = 0.0, high: float = math.inf) -> float:
    """`value` as a float: a real scalar (Python, NumPy, or a one-element real tensor) in
    [low, high], finite unless a bound is infinite."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")  # fmt: skip
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not low <= value <= high:
        if high == math.inf and low > -math.inf:
            raise ValueError(f"{name} must be finite and >= {low:g}, got {value!r}")
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    if math.isinf(value) and low > -math.inf and high < math.inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_strength(strength) -> float:
    """A penalty strength: a finite real scalar >= 0."""
    if strength.__class__ is float and 0.0 <= strength < math.inf:  # the common case, quickly
        return strength
    value = check_real("strength", strength)
    if math.isinf(value):
        raise ValueError(f"strength must be finite and >= 0, got {value!r}")
    return value


def prepare(tensors: Tensors, kind: str, groups: Grouping, options: dict):
    """A penalty call on tensors, validated: (list of tensors, groupings, alpha)."""
    tensors = as_tensor_list(tensors)
    check_tensors(tensors)
    groupings = check_groupings(groups, tensors)
    alpha = check_kind(kind, options)
    return tensors, groupings, alpha


# --- coupled groups ------------------------------------------------------------------------------


def check_coupled(coupled: list, tensors) -> None:
    """Coupled groups must have floating parameters on one device, members sliced along dim 0 or
    1 of their parameter, all parameters among `tensors` (if given: a check against groups
    traced on another copy of the model), and indices in range (not re-checked inside a
    torch.compile'd function)."""
    params = [m.param for cg in coupled for m in cg.members]
    check_tensors(params)
    allowed = None
    if tensors is not None:
        allowed = {id(t) for t in as_tensor_list(tensors, module_params=True)}
    for cg in coupled:
        for m in cg.members:
            if allowed is not None and id(m.param) not in allowed:
                raise ValueError(
                    f"coupled group {cg.root!r}: parameter {m.name!r} is not among `tensors` "
                    "(were the groups traced on another copy of the model?)"
                )
            if m.dim not in GROUPING_OF_DIM or m.param.dim() <= m.dim:
                raise ValueError(
                    f"coupled group {cg.root!r}: {m.name} is sliced along dim {m.dim}; members "
                    f"are slices along dim 0 or 1, and it has shape {tuple(m.param.shape)}"
                )
            if torch.compiler.is_compiling():
                # Index ranges are data: checking them would make torch.compile guard on (or
                # break at) the values. They are checked in every eager call.
                continue
            size = m.param.shape[m.dim]
            if m.index.numel() and (int(m.index.min()) < 0 or int(m.index.max()) >= size):
                raise ValueError(f"coupled group {cg.root!r}: index out of range for {m.name}")
            if m.group.numel() and (int(m.group.min()) < 0 or int(m.group.max()) >= cg.num_groups):
                raise ValueError(f"coupled group {cg.root!r}: group id out of range for {m.name}")


# --- the gradients of in-place calls -------------------------------------------------------------


def check_grads(tensors: list[torch.Tensor], *, name: str = "tensors") -> None:
    """Distinct tensors whose .grad, where set, is dense, floating and shaped like the tensor on
    its device; a DTensor's gradient is a DTensor placed like it."""
    check_distinct(tensors, name=name)
    module = sys.modules.get("torch.distributed.tensor")
    for i, t in enumerate(tensors):
        g = t.grad
        if g is None:
            continue
        if g.shape != t.shape or g.device != t.device or g.layout != torch.strided:
            raise ValueError(
                f"{name}[{i}].grad has shape {tuple(g.shape)} on {g.device} ({g.layout}); "
                f"expected a dense gradient of shape {tuple(t.shape)} on {t.device}"
            )
        if not g.is_floating_point():
            raise TypeError(f"{name}[{i}].grad has dtype {g.dtype}; expected floating point")
        sharded = module is not None and isinstance(t, module.DTensor)
        if sharded and (
            not isinstance(g, module.DTensor) or tuple(g.placements) != tuple(t.placements)
        ):
            where = g.placements if isinstance(g, module.DTensor) else "a plain tensor"
            raise ValueError(
                f"{name}[{i}].grad is {where}; expected a DTensor placed like its parameter "
                f"({t.placements})"
            )


def allocate_missing_grads(tensors: Sequence[torch.Tensor]) -> None:
    """Give every tensor without a .grad one of zeros, in `grad_dtype(t)` (fp32 gradients of
    bf16 parameters where torch sets `t.grad_dtype`); a DTensor gets a DTensor placed like it.

    >>> w = torch.ones(2, requires_grad=True)
    >>> allocate_missing_grads([w])
    >>> w.grad
    tensor([0., 0.])
    """
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t, dtype=grad_dtype(t))


def with_grads_like_weights(
    weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], run: Callable
):
    """run(weights, targets), where targets[i] is grads[i] if it has weights[i]'s strides, else a
    zero buffer laid out like weights[i] that is added to grads[i] afterwards: the kernels write
    a gradient with its weight's strides. Returns what run returns.

    >>> w, g = torch.ones(2, 3), torch.zeros(3, 2).t()  # g is not laid out like w
    >>> with_grads_like_weights([w], [g], lambda ws, gs: gs[0].add_(ws[0]).sum().item())
    6.0
    >>> g.sum().item()
    6.0
    """
    targets, staging = [], []
    for w, g in zip(weights, grads):
        if g.stride() != w.stride():
            staged = torch.zeros_like(w, dtype=g.dtype)
            staging.append((g, staged))
            g = staged
        targets.append(g)
    result = run(weights, targets)
    for g, staged in staging:
        g.add_(staged)
    return result


# --- prox ----------------------------------------------------------------------------------------


def check_prox_kind(kind: str) -> None:
    if kind not in PROX_KINDS:
        raise ValueError(f"unknown prox kind {kind!r}; valid kinds: {', '.join(PROX_KINDS)}")


def check_threshold(kind: str, threshold) -> None:
    values = threshold if isinstance(threshold, (tuple, list)) else (threshold,)
    if isinstance(threshold, (tuple, list)) and (kind != "l0_group_lasso" or len(values) != 2):
        raise ValueError(
            f"a pair of thresholds is only accepted by 'l0_group_lasso', got {threshold!r} for "
            f"{kind!r}"
        )
    for t in values:
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            t = t.item()
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"threshold must be a real number, got {type(t).__name__}")
        if math.isnan(t) or t < 0:
            raise ValueError(f"threshold must be >= 0, got {t}")
