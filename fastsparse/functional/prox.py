"""The prox op's public functions `prox_` and `scale_groups_`: validation, then one routing to
DTensors, the fused kernels or the oracle.

The math lives in fastsparse/reference/prox.py (the oracle); every argument is checked before
anything is written, so a bad call leaves all tensors unchanged, and the backend is picked in one
place (`_dispatch`).

Thresholding rule (shared with `fastsparse.prune`): an element is dead when |w| <= t, a group when
its l2 norm n <= t.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from fastsparse import ops, reference
from fastsparse.backends import BACKENDS, resolve_backend
from fastsparse.core.checks import (
    as_tensor_list,
    check_coupled,
    check_groupings,
    check_prox_kind,
    check_tensors,
    check_threshold,
    is_sharded,
)
from fastsparse.core.contract import AdamStepOptions, SGDStepOptions, StepOptions
from fastsparse.core.groups import CoupledGroup, as_coupled_list, coupled_params, is_coupled
from fastsparse.core.layout import encode_groupings, group_count, segment_geometry
from fastsparse.functional.penalty import coupled_backend

__all__ = ["PROX_BACKENDS", "adam_prox_", "prox_", "scale_groups_", "sgd_prox_"]

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
    check_prox_kind(kind)
    _check_backend(backend)
    check_threshold(kind, threshold)
    if is_coupled(groups):
        coupled = as_coupled_list(groups)
        check_coupled(coupled, tensors)
        if is_sharded(coupled_params(coupled)):
            from fastsparse import distributed

            return distributed.coupled_prox_(coupled, kind, threshold, backend)
        return _dispatch(None, kind, threshold, coupled, backend)
    tensor_list = _tensor_list(tensors)
    check_groupings(groups, tensor_list, single="prox_")
    if is_sharded(tensor_list):
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
        layout, name = coupled_backend(groups, backend)
        if name == "torch" or kind not in ("group_lasso", "group_l0"):
            return reference.prox_(None, kind, threshold, groups)
        with torch.no_grad():
            kept = ops.call(
                ops.coupled_prox_op,
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
    with torch.no_grad():
        # The kernels write in place through the weights' strides; a layout they cannot
        # address is thresholded on a contiguous copy, then copied back.
        weights = [t.detach() for t in nonempty]
        weights = [
            w if segment_geometry(w, groups) is not None else w.contiguous() for w in weights
        ]
        flat = ops.call(
            ops.prox_op, weights, encode_groupings((groups,)), kind, t_elem, t_group, name
        )
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


def scale_groups_(
    tensors: Tensors,
    factors: Sequence[torch.Tensor],
    *,
    groups: Union[str, None, CoupledGroup, Sequence[CoupledGroup]] = "filters",
    backend: str = "auto",
) -> None:
    """Multiply every group by its factor in place, w_g ← f_g·w_g, in one fused pass.

    A mask is a factor: ``scale_groups_(params, kept)`` with the bool masks that `prox_`
    returns re-zeroes the dead groups (after an optimizer step has moved them, say) without a
    mask of the weights' size. New values are computed in fp32 (fp64 for fp64 tensors) and
    rounded once.

    Args:
        tensors: as in `prox_` (None with coupled groups).
        factors: one 1-D tensor per tensor, of shape [groups of the grouping] (one per
            CoupledGroup, shape [G], with coupled groups), floating or bool. An element in
            several coupled groups is multiplied by each of their factors.
        groups, backend: as in `prox_`.

    Raises:
        ValueError: a factor count or shape that does not match the groups, or the errors of
            `prox_`. Nothing is modified.
        TypeError: a factor that is neither floating nor bool.

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> scale_groups_(w, [torch.tensor([False, True])])
        >>> w
        tensor([[0.0000, 0.0000],
                [0.3000, 0.4000]])
    """
    _check_backend(backend)
    factors = [factors] if isinstance(factors, torch.Tensor) else list(factors)
    if is_coupled(groups):
        coupled = as_coupled_list(groups)
        check_coupled(coupled, tensors)
        counts = [cg.num_groups for cg in coupled]
        owners = [f"coupled group {i}" for i in range(len(coupled))]
    else:
        tensor_list = _tensor_list(tensors)
        check_groupings(groups, tensor_list, single="scale_groups_")
        counts = [group_count(t.shape, groups) for t in tensor_list]
        owners = [f"tensor {i} {tuple(t.shape)}" for i, t in enumerate(tensor_list)]
    _check_factors(factors, counts, owners)
    if is_coupled(groups):
        if is_sharded(coupled_params(coupled)):
            from fastsparse import distributed

            return distributed.coupled_scale_groups_(coupled, factors, backend)
        layout, name = coupled_backend(coupled, backend)
        if name == "torch":
            return reference.scale_groups_(None, factors, coupled)
        flat = _flat_factors(factors, layout.params[0].device, torch.float64)
        with torch.no_grad():
            ops.call(
                ops.coupled_scale_groups_op,
                [p.detach() for p in layout.params],
                layout.slice_groups,
                layout.specs,
                layout.group_counts,
                flat,
                name,
            )
        return None
    if is_sharded(tensor_list):
        from fastsparse import distributed

        return distributed.scale_groups_(tensor_list, factors, groups)
    pairs = [(t, f) for t, f in zip(tensor_list, factors) if t.numel() > 0]
    if not pairs:
        return None
    name = resolve_backend(backend, pairs[0][0].device)
    if name == "torch":
        return reference.scale_groups_([t for t, _ in pairs], [f for _, f in pairs], groups)
    with torch.no_grad():
        weights = [t.detach() for t, _ in pairs]
        weights = [
            w if segment_geometry(w, groups) is not None else w.contiguous() for w in weights
        ]
        flat = _flat_factors([f for _, f in pairs], weights[0].device, torch.float64)
        ops.call(ops.scale_groups_op, weights, encode_groupings((groups,)), flat, name)
        for (t, _), w in zip(pairs, weights):
            if w.data_ptr() != t.data_ptr():
                t.copy_(w)
    return None


def _tensor_list(tensors) -> list[torch.Tensor]:
    """The `tensors` argument of `prox_` and `scale_groups_` (not coupled groups), validated."""
    tensor_list = as_tensor_list(tensors, module_params=True)
    check_tensors(tensor_list)
    return tensor_list


def _check_backend(backend: str) -> None:
    if backend not in PROX_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(PROX_BACKENDS)}")


def _check_factors(factors, counts, owners) -> None:
    if len(factors) != len(counts):
        raise ValueError(f"got {len(factors)} factor tensors for {len(counts)} groups' owners")
    for f, count, owner in zip(factors, counts, owners):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"factors must be tensors, got {type(f).__name__} for {owner}")
        if not (f.dtype.is_floating_point or f.dtype == torch.bool):
            raise TypeError(f"factors must be floating or bool, got {f.dtype} for {owner}")
        if f.dim() != 1 or f.numel() != count:
            raise ValueError(
                f"{owner} has {count} groups, but its factors have shape {tuple(f.shape)}"
            )


def _flat_factors(factors, device, dtype) -> torch.Tensor:
    """Every factor in one flat tensor, in the kernels' group order (tensor by tensor)."""
    if not factors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([f.to(device=device, dtype=dtype).reshape(-1) for f in factors])


def sgd_prox_(
    params: Sequence[torch.Tensor],
    kind: str,
    threshold: Union[float, Sequence[float]],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    bufs: Optional[Sequence[torch.Tensor]] = None,
    first: bool = False,
    groups: Union[str, None] = "filters",
    backend: str = "auto",
) -> Optional[list]:
    """torch.optim.SGD's step on `params` (their ``.grad``), then `prox_`, in one fused pass.

    The step is SGD's: d = grad + weight_decay * w; with momentum (`bufs`: one buffer per
    parameter, laid out like it), buf = d at the first step (``first=True``: the buffers'
    contents are not read), else momentum * buf + (1 - dampening) * d, and d = buf (Nesterov:
    d + momentum * buf); w -= lr * d. Then the prox of `kind` with `threshold`, as `prox_`.
    Each group is read once from memory (weights, gradients, buffers) and written once; the
    group factor is applied to the values just written, still in cache.

    Returns the kept masks as `prox_` does, or None where no fused pass serves these tensors
    (the oracle backend, CUDA tensors on the native backend, fp16 / bf16 on the native one,
    groups longer than one block, weights, gradients and buffers of different layouts):
    nothing is modified then, and the caller runs the step and the prox separately.

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]], requires_grad=True)
        >>> w.grad = torch.ones_like(w)
        >>> masks = sgd_prox_([w], "group_l0", 1.0, lr=0.1, backend="native")
        >>> w.detach()
        tensor([[2.9000, 3.9000],
                [0.0000, 0.0000]])
    """
    options = SGDStepOptions(
        lr=float(lr),
        momentum=float(momentum),
        dampening=float(dampening),
        weight_decay=float(weight_decay),
        nesterov=bool(nesterov),
        first=bool(first) or momentum == 0,
    )
    states = [list(bufs)] if momentum != 0 and bufs is not None else []
    return step_prox_(params, kind, threshold, options, states, groups=groups, backend=backend)


def adam_prox_(
    params: Sequence[torch.Tensor],
    kind: str,
    threshold: Union[float, Sequence[float]],
    *,
    lr: float,
    step: int,
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    betas: tuple = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = True,
    groups: Union[str, None] = "filters",
    backend: str = "auto",
) -> Optional[list]:
    """torch.optim.AdamW's step (``decoupled=False``: Adam's) on `params`, then `prox_`, in
    one fused pass, as `sgd_prox_`.

    `step` is the step number t after this step (1 at the first); `exp_avgs` and `exp_avg_sqs`
    the moment buffers, updated in place: w *= 1 - lr * weight_decay (AdamW; Adam adds
    weight_decay * w to the gradient), m = lerp(m, g, 1 - beta1), v = beta2 v + (1 - beta2) g^2,
    w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps). Returns the kept masks,
    or None where no fused pass serves these tensors (nothing modified).
    """
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"step must be an integer >= 1 (the step being taken), got {step!r}")
    _check_betas(betas)  # before the bias corrections, which need them below 1
    options = AdamStepOptions.at_step(
        step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled
    )
    states = [list(exp_avgs), list(exp_avg_sqs)]
    return step_prox_(params, kind, threshold, options, states, groups=groups, backend=backend)


def step_prox_(
    params: Sequence[torch.Tensor],
    kind: str,
    threshold: Union[float, Sequence[float]],
    options: StepOptions,
    states: Sequence[Sequence[torch.Tensor]],
    *,
    groups: Union[str, None] = "filters",
    backend: str = "auto",
) -> Optional[list]:
    """The optimizer step of `options` (`SGDStepOptions`, `AdamStepOptions`) on `params`, then
    `prox_`, in one fused pass: what `sgd_prox_` and `adam_prox_` run, for callers that hold the
    options already (`SparseOptimizer`).

    `states` holds the state buffers, each a list with one tensor per parameter, laid out like
    it: SGD with momentum ``[bufs]`` (without: ``[]``), Adam ``[exp_avgs, exp_avg_sqs]``.
    Returns the kept masks (one bool tensor of shape [groups] per parameter), or None where no
    fused pass serves these tensors (nothing modified).

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [0.3, 0.4]], requires_grad=True)
        >>> w.grad = torch.ones_like(w)
        >>> sgd = SGDStepOptions(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
        ...                      nesterov=False, first=True)
        >>> [m.tolist() for m in step_prox_([w], "group_l0", 1.0, sgd, [], backend="native")]
        [[True, False]]
    """
    params = list(params)
    states = [list(state) for state in states]
    _check_step_options(options, states)
    check_prox_kind(kind)
    _check_backend(backend)
    check_threshold(kind, threshold)
    # Name the public function the user called (SparseOptimizer validates its rules itself).
    name = "sgd_prox_" if isinstance(options, SGDStepOptions) else "adam_prox_"
    check_groupings(groups, params, single=name)
    if any(len(state) != len(params) for state in states):
        raise ValueError("give one state buffer per parameter")
    if isinstance(options, SGDStepOptions) and not states:
        states = [[p.detach() for p in params]]  # never read (first): the kernels' buffer slot
    if not params or is_sharded(params):
        return None
    grads = [p.grad for p in params]
    if any(g is None or g.is_sparse for g in grads):
        return None
    for i, p in enumerate(params):
        layout = (p.dtype, p.shape, p.stride(), p.device)
        for t in [grads[i]] + [state[i] for state in states]:
            if (t.dtype, t.shape, t.stride(), t.device) != layout:
                return None
        if p.numel() == 0 or segment_geometry(p.detach(), groups) is None:
            return None
    name = resolve_backend(backend, params[0].device)
    if name not in ("native", "triton") or (name == "native" and params[0].device.type != "cpu"):
        return None  # the native pass is CPU code; the Triton one runs where Triton does
    t_elem, t_group = reference.prox_thresholds(kind, threshold)
    with torch.no_grad():
        flat = ops.step_prox(
            [p.detach() for p in params],
            [g.detach() for g in grads],
            [t.detach() for state in states for t in state],
            encode_groupings((groups,)),
            options,
            kind,
            t_elem,
            t_group,
            name,
        )
    counts = [group_count(p.shape, groups) for p in params]
    if flat.numel() == 0 and sum(counts) > 0:
        return None
    return list(torch.split(flat, counts))


def _check_step_options(options: StepOptions, states: list) -> None:
    """Refuse what torch.optim refuses, and states that do not fit the optimizer."""
    if isinstance(options, SGDStepOptions):
        if options.momentum != 0 and len(states) != 1:
            raise ValueError("SGD with momentum needs bufs= (one buffer per parameter)")
        if options.momentum == 0 and states:
            raise ValueError("SGD without momentum keeps no state buffers")
        if options.nesterov and (options.momentum <= 0 or options.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    elif isinstance(options, AdamStepOptions):
        _check_betas((options.beta1, options.beta2))
        if len(states) != 2:
            raise ValueError("Adam's step needs its two moment buffers (exp_avgs, exp_avg_sqs)")
    else:
        raise TypeError(f"not step options: {type(options).__name__}")


def _check_betas(betas) -> None:
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be in [0, 1), got {tuple(betas)!r}")
