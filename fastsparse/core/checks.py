"""Every validator of the public API, in one place: a call is checked completely before anything
is computed or written, so a bad call leaves every tensor unchanged.
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Sequence, Union

import torch

from fastsparse.core.contract import (
    GROUPINGS,
    KINDS,
    MIN_DIMS,
    PROX_KINDS,
    Grouping,
    as_groupings,
)

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def as_tensor_list(tensors: Tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if isinstance(tensors, (str, bytes)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"expected a tensor or a sequence of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    return tensors


def check_tensors(tensors: list[torch.Tensor]) -> None:
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


def check_groupings(groups: Grouping, tensors: list[torch.Tensor]) -> tuple:
    groupings = as_groupings(groups)
    if not groupings:
        raise ValueError("groups is an empty sequence; give at least one grouping")
    valid = ", ".join(repr(g) for g in GROUPINGS)
    for g in groupings:
        if g not in GROUPINGS:
            raise ValueError(f"unknown grouping {g!r}; valid groupings: {valid} or a tuple of them")
        need = MIN_DIMS[g]
        for i, t in enumerate(tensors):
            if need and t.dim() < need:
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
    tensors = as_tensor_list(tensors)
    check_tensors(tensors)
    groupings = check_groupings(groups, tensors)
    alpha = check_kind(kind, options)
    return tensors, groupings, alpha


def check_coupled(coupled: list, tensors) -> None:
    """Coupled groups must have floating parameters on one device, all among `tensors` (if
    given: a check against groups traced on another copy of the model), and indices in range
    (not re-checked inside a torch.compile'd function)."""
    params = [m.param for cg in coupled for m in cg.members]
    check_tensors(params)
    allowed = None
    if tensors is not None:
        if isinstance(tensors, torch.nn.Module):
            tensors = list(tensors.parameters())
        allowed = {id(t) for t in as_tensor_list(tensors)}
    for cg in coupled:
        for m in cg.members:
            if allowed is not None and id(m.param) not in allowed:
                raise ValueError(
                    f"coupled group {cg.root!r}: parameter {m.name!r} is not among `tensors` "
                    "(were the groups traced on another copy of the model?)"
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


def check_grads(tensors: list[torch.Tensor]) -> None:
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


def prox_tensor_list(tensors) -> list[torch.Tensor]:
    if tensors is None:
        raise ValueError("tensors is None; it may only be None with coupled groups")
    if isinstance(tensors, torch.nn.Module):
        tensors = list(tensors.parameters())
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(f"tensors[{i}] has dtype {t.dtype}; prox_ needs floating tensors")
    return tensors


def check_grouping(groups, tensors: list[torch.Tensor]) -> None:
    if isinstance(groups, (tuple, list)):
        raise ValueError(
            f"prox_ takes one grouping, not a tuple of groupings ({groups!r}); valid groupings: "
            f"{', '.join(map(repr, GROUPINGS))} or coupled groups"
        )
    if groups not in GROUPINGS:
        raise ValueError(
            f"unknown grouping {groups!r}; valid groupings: {', '.join(map(repr, GROUPINGS))} "
            "or coupled groups"
        )
    min_dims = MIN_DIMS[groups]
    for i, t in enumerate(tensors):
        if t.dim() < min_dims:
            raise ValueError(
                f"grouping {groups!r} needs tensors with at least {min_dims} dims; tensors[{i}] "
                f"has shape {tuple(t.shape)}"
            )


def is_sharded(tensors) -> bool:
    """True if any of the tensors is a DTensor (only possible once torch imported DTensor)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and any(isinstance(t, module.DTensor) for t in tensors)
