"""Proximal and threshold steps: the public `prox_` with validation and backend dispatch.

The math lives in `fastsparse.reference.prox_` (the oracle); this module checks every argument
before anything is written, so a bad call leaves all tensors unchanged, and picks a backend in
one place (`_dispatch`).

Thresholding rule (shared with `fastsparse.prune`): an element is dead when |w| <= t, a group when
its l2 norm n <= t.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence, Union

import torch

from fastsparse import reference
from fastsparse.backends import BACKENDS, resolve_backend
from fastsparse.functional import _coupled_backend, _sharded, check_coupled
from fastsparse.layout import encode_groupings, group_count, segment_geometry
from fastsparse.reference import GROUPINGS, PROX_KINDS, CoupledGroup

__all__ = ["PROX_BACKENDS", "PROX_KINDS", "prox_"]

PROX_BACKENDS = BACKENDS

Tensors = Union[torch.Tensor, Iterable[torch.Tensor], torch.nn.Module, None]


def prox_(
    tensors: Tensors,
    kind: str,
    threshold: Union[float, Sequence[float]],
    *,
    groups: Union[str, None, CoupledGroup, Sequence[CoupledGroup]] = "filters",
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Apply a proximal / threshold step in place and return the masks of kept groups.

    Kinds (t = threshold, n = group l2 norm, statistics in fp32, fp64 for fp64 tensors):

    - ``"l1"``: soft threshold, w ← sign(w)·max(|w| − t, 0).
    - ``"l0"``: hard threshold, w ← 0 where |w| <= t.
    - ``"group_lasso"``: group soft threshold, w ← w·max(0, 1 − t/n); zero groups stay zero.
    - ``"group_l0"``: w ← 0 in every group with n <= t.
    - ``"l0_group_lasso"``: hard threshold the elements, then group-shrink what is left (the
      l0 + l2,1 step of Bui et al.); `threshold` may be a pair ``(t_l0, t_group)``.

    Args:
        tensors: a floating tensor, an iterable of them, or an ``nn.Module`` (its parameters).
            With coupled groups the tensors touched are those of the groups; `tensors` may then
            be None, else every group parameter must be one of `tensors` (a check against
            groups traced on another copy of the model).
        kind: one of :data:`PROX_KINDS`.
        threshold: t >= 0.
        groups: ``"filters"`` (dim 0), ``"channels"`` (dim 1), ``"kernels"`` (dims 0 and 1),
            ``None`` (the whole tensor), or coupled groups from `fastsparse.coupled_groups`.
        backend: as in `fastsparse.penalty` ("auto", "triton", "native", "cuda", "torch").

    Returns:
        A list of bool tensors, one per tensor (shape [groups of the grouping]) or one per
        CoupledGroup (shape [G]): True where the group survived.

    Raises:
        ValueError: negative or NaN threshold, unknown kind, grouping or backend, a tuple of
            groupings, a tensor with too few dims for the grouping, or coupled groups whose
            parameters are not among `tensors`. Nothing is modified.
        TypeError: a non-floating tensor or a non-numeric threshold. Nothing is modified.

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> prox_(w, "group_l0", 1.0)
        [tensor([ True, False])]
        >>> w
        tensor([[3., 4.],
                [0., 0.]])
    """
    if kind not in PROX_KINDS:
        raise ValueError(f"unknown prox kind {kind!r}; valid kinds: {', '.join(PROX_KINDS)}")
    if backend not in PROX_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(PROX_BACKENDS)}")
    _check_threshold(kind, threshold)
    if reference.is_coupled(groups):
        coupled = [groups] if isinstance(groups, CoupledGroup) else list(groups)
        check_coupled(coupled, tensors)
        if _sharded(reference.coupled_params(coupled)):  # DTensors: fastsparse/distributed.py
            from fastsparse import distributed

            return distributed.coupled_prox_(coupled, kind, threshold, backend)
        return _dispatch(None, kind, threshold, coupled, backend)
    tensor_list = _tensor_list(tensors)
    _check_grouping(groups, tensor_list)
    if _sharded(tensor_list):  # DTensors: fastsparse/distributed.py
        from fastsparse import distributed

        return distributed.prox_(tensor_list, kind, threshold, groups, backend)
    return _dispatch(tensor_list, kind, threshold, groups, backend)


def _dispatch(tensors, kind, threshold, groups, backend):
    """The single place where a backend is chosen. Arguments are already validated.

    The fused kernels serve every kind on tensors, and group_lasso / group_l0 on coupled
    groups; the oracle serves the rest (element kinds and l0_group_lasso on coupled groups,
    whose "once per covered element" rule has no fused form yet).
    """
    t_elem, t_group = threshold if isinstance(threshold, (tuple, list)) else (threshold,) * 2
    t_elem, t_group = float(t_elem), float(t_group)
    if tensors is None:
        layout, name = _coupled_backend(groups, backend)
        if name == "torch" or kind not in ("group_lasso", "group_l0"):
            return reference.prox_(None, kind, threshold, groups)
        from fastsparse import ops

        with torch.no_grad():
            kept = ops.coupled_prox_op(
                layout.params,
                layout.slice_groups,
                layout.specs,
                layout.group_counts,
                kind,
                t_group,
                name,
            )
        return list(torch.split(kept, layout.group_counts))
    nonempty = [t for t in tensors if t.numel() > 0]
    name = resolve_backend(backend, nonempty[0].device) if nonempty else "torch"
    if name == "torch":
        return reference.prox_(tensors, kind, threshold, groups)
    from fastsparse import ops

    with torch.no_grad():
        # The kernels write in place through the weights' strides; a layout they cannot
        # address is thresholded on a contiguous copy, then copied back.
        weights = [t.detach() for t in nonempty]
        weights = [
            w if segment_geometry(w, groups) is not None else w.contiguous() for w in weights
        ]
        flat = ops.prox_op(weights, encode_groupings((groups,)), kind, t_elem, t_group, name)
        for t, w in zip(nonempty, weights):
            if w.data_ptr() != t.data_ptr():
                t.copy_(w)
    kept = iter(torch.split(flat, [group_count(w.shape, groups) for w in weights]))
    return [
        next(kept)
        if t.numel()
        else torch.zeros(group_count(t.shape, groups), dtype=torch.bool, device=t.device)
        for t in tensors
    ]


def _check_threshold(kind: str, threshold) -> None:
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


def _tensor_list(tensors) -> list[torch.Tensor]:
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


def _check_grouping(groups, tensors: list[torch.Tensor]) -> None:
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
    min_dims = {"channels": 2, "kernels": 3}.get(groups, 0)
    for i, t in enumerate(tensors):
        if t.dim() < min_dims:
            raise ValueError(
                f"grouping {groups!r} needs tensors with at least {min_dims} dims; tensors[{i}] "
                f"has shape {tuple(t.shape)}"
            )
