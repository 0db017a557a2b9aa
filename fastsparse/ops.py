"""torch.library registration of every fused op, in one place: schemas, fake kernels, autograd.

The ops are opaque to torch.compile (they launch pointer-table kernels), declare exactly what they
mutate, and have fake kernels so that `torch.compile(fullgraph=True)` traces through them. Callers
go through `call(op, ...)`: the op itself under torch.compile, its implementation (with the same
autograd) in eager mode, where a torch.library op would cost dispatcher time per call and import
torch._dynamo (seconds) at its first call. They
run fastsparse/engine.py on a backend of fastsparse/backends/ ("triton": the Triton kernels;
"native": the CPU and CUDA C++), imported on first call so that `import fastsparse` never
imports triton or initializes CUDA.

`groups` strings say which segments a tensor list is cut into (fastsparse/core/layout.py): a
groupings list ("filters,channels", "none" for None) or explicit specs ("@0:filters,1:channels",
used for coupled groups, with `slice_groups` and `group_counts`: see fastsparse/core/groups.py).
"""

from __future__ import annotations

import functools
import typing
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastsparse import engine
from fastsparse.backends import fused_backend as _backend
from fastsparse.backends import op_kernels
from fastsparse.core.contract import (
    COEFFICIENT_DTYPE,
    AdamStepOptions,
    SGDStepOptions,
    StepOptions,
)
from fastsparse.core.contract import accumulation_dtype_of as _acc_dtype
from fastsparse.core.layout import decode_specs, group_count

# --- eager calls ---------------------------------------------------------------------------------

_IMPLEMENTATIONS: dict = {}  # id(op) -> its Python implementation
_AUTOGRAD: dict = {}  # id(op) -> (setup_context, backward) of a differentiable op


def _op(name: str, mutates_args=()):
    """Register the decorated function as the op fastsparse::<name>, and keep it for eager calls."""

    def register(fn):
        fn = _on_tensor_device(fn)
        op = torch.library.custom_op(f"fastsparse::{name}", fn, mutates_args=mutates_args)
        _IMPLEMENTATIONS[id(op)] = fn
        return op

    return register


def _on_tensor_device(fn, device: Optional[torch.device] = None):
    """fn run with its tensors' CUDA device current (or `device`'s, when given): kernels launch
    on the current device, so tensors on cuda:1 while cuda:0 is current would be read by the
    wrong GPU."""

    @functools.wraps(fn)
    def guarded(*args):
        target = _cuda_device_of(args) if device is None else device
        if target is None or target.index == torch.cuda.current_device():
            return fn(*args)
        with torch.cuda.device(target):
            return fn(*args)

    return guarded


def _cuda_device_of(args) -> Optional[torch.device]:
    """The device of the first CUDA tensor among args (tensors or lists of tensors), or None."""
    for arg in args:
        tensor = arg[0] if isinstance(arg, (list, tuple)) and arg else arg
        if isinstance(tensor, Tensor):
            return tensor.device if tensor.is_cuda else None
    return None


def _autograd(op, backward, setup_context) -> None:
    """register_autograd, and the same functions for the eager call."""
    op.register_autograd(backward, setup_context=setup_context)
    _AUTOGRAD[id(op)] = (setup_context, backward)


def call(op, *args):
    """op(*args) under torch.compile; its implementation, with the same autograd, otherwise."""
    if torch.compiler.is_compiling():
        return op(*args)
    if id(op) in _AUTOGRAD:
        return FastsparseEager.apply((op, args[1:]), *args[0])
    return _IMPLEMENTATIONS[id(op)](*args)


class FastsparseEager(torch.autograd.Function):
    """A differentiable op's eager call: its first argument is the list of differentiable
    tensors (unpacked here, where autograd can see them), its setup_context and backward are the
    ones registered with torch.library."""

    @staticmethod
    def forward(ctx, op_and_rest, *tensors):
        op, rest = op_and_rest
        inputs = (list(tensors), *rest)
        output = _IMPLEMENTATIONS[id(op)](*inputs)
        setup_context, ctx.backward_fn = _AUTOGRAD[id(op)]
        setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grad_outputs):
        ctx.eager = True
        grads = ctx.backward_fn(ctx, *grad_outputs)[0]
        return (None, *grads)


def _in_backward(ctx, op, *args):
    """A backward's op: the op in compiled graphs, its implementation in eager calls."""
    if getattr(ctx, "eager", False):
        return _IMPLEMENTATIONS[id(op)](*args)
    return op(*args)


def _specs(weights: List[Tensor], groups: str):
    return decode_specs(groups, len(weights))


def _total_groups(weights: List[Tensor], groups: str) -> int:
    return sum(group_count(weights[ti].shape, g) for ti, g, _ in _specs(weights, groups))


def _scalar(weights: List[Tensor]) -> Tensor:
    return weights[0].new_empty((), dtype=_acc_dtype(weights))


# --- penalty value (differentiable) and its backward --------------------------------------------


@_op("penalty", mutates_args=())
def penalty_op(
    weights: List[Tensor], kind: str, groups: str, alpha: float, backend: str
) -> Tuple[Tensor, Tensor]:
    """(value, per-group gradient coefficients [groups, 2]) of the summed penalty."""
    return engine.penalty_forward(_backend(backend), weights, kind, _specs(weights, groups), alpha)


@penalty_op.register_fake
def _(weights, kind, groups, alpha, backend):
    coefs = weights[0].new_empty((_total_groups(weights, groups), 2), dtype=COEFFICIENT_DTYPE)
    return _scalar(weights), coefs


@_op("penalty_backward_flat", mutates_args=())
def penalty_backward_flat_op(
    weights: List[Tensor], coefs: Tensor, grad_value: Tensor, groups: str, backend: str
) -> List[Tensor]:
    """Flat buffers (engine.backward_layout) of grad_value * (a_g sign(w) + b_g w) for every
    weight; `penalty_gradients` gives each weight's gradient (views: an op's outputs may not
    alias each other)."""
    return engine.penalty_backward_flat(
        _backend(backend), weights, coefs, grad_value, _specs(weights, groups)
    )


@penalty_backward_flat_op.register_fake
def _(weights, coefs, grad_value, groups, backend):
    layout = engine.backward_layout(weights, _specs(weights, groups))
    return [weights[0].new_empty((n,), dtype=d) for d, n in zip(layout.dtypes, layout.sizes)]


def penalty_gradients(weights, coefs, grad_value, groups: str, backend: str, ctx=None) -> list:
    """Per weight, grad_value * (a_g sign(w) + b_g w) in its dtype and layout, through
    `penalty_backward_flat_op` (inside an autograd backward: `ctx`, see `_in_backward`)."""
    args = (weights, coefs, grad_value, groups, backend)
    flats = (
        call(penalty_backward_flat_op, *args)
        if ctx is None
        else _in_backward(ctx, penalty_backward_flat_op, *args)
    )
    return engine.backward_gradients(weights, flats, _specs(weights, groups))


def _backward(ctx, grad_value, _grad_coefs):
    *weights, coefs = ctx.saved_tensors
    grads = penalty_gradients(weights, coefs, grad_value, ctx.groups, ctx.backend, ctx)
    return (grads,) + (None,) * ctx.other_inputs


def _setup_context(ctx, inputs, output, groups_position, backend_position):
    _, coefs = output
    ctx.mark_non_differentiable(coefs)
    ctx.save_for_backward(*inputs[0], coefs)
    ctx.groups, ctx.backend = inputs[groups_position], inputs[backend_position]
    ctx.other_inputs = len(inputs) - 1


_autograd(
    penalty_op, _backward, lambda ctx, inputs, output: _setup_context(ctx, inputs, output, 2, 4)
)


# --- in-place gradient and group norms ----------------------------------------------------------


@_op("add_penalty_grad_", mutates_args=("grads",))
def add_penalty_grad_op(
    grads: List[Tensor],
    weights: List[Tensor],
    kind: str,
    groups: str,
    alpha: float,
    strength: float,
    backend: str,
) -> Tensor:
    """grads[i] += strength * dR/dW_i; returns the penalty value R (0-dim)."""
    return engine.add_penalty_grad(
        _backend(backend), grads, weights, kind, _specs(weights, groups), alpha, strength
    )


@add_penalty_grad_op.register_fake
def _(grads, weights, kind, groups, alpha, strength, backend):
    return _scalar(weights)


def prepare_add_penalty_grad(
    grads, weights, kind: str, groups: str, alpha: float, backend: str
) -> engine.PreparedAddPenaltyGrad:
    """add_penalty_grad_op's eager call prepared for these tensors (`.run(strength)` -> value),
    run with their CUDA device current as every op is: for training loops that call it every
    step. Not for torch.compile, which calls the op itself."""
    prepared = engine.PreparedAddPenaltyGrad(
        _backend(backend), grads, weights, kind, _specs(weights, groups), alpha
    )
    device = _cuda_device_of((weights,))
    if device is not None:
        prepared.run = _on_tensor_device(prepared.run, device)
    return prepared


@_op("group_norms", mutates_args=())
def group_norms_op(weights: List[Tensor], groups: str, backend: str) -> Tensor:
    """The group l2 norms of all weights, concatenated (split them by group counts)."""
    return engine.group_norms(_backend(backend), weights, _specs(weights, groups))


@group_norms_op.register_fake
def _(weights, groups, backend):
    return weights[0].new_empty((_total_groups(weights, groups),), dtype=_acc_dtype(weights))


# --- group statistics, and the gradient of given coefficients (sharded tensors) ------------------


@_op("group_stats", mutates_args=())
def group_stats_op(weights: List[Tensor], groups: str, backend: str) -> Tensor:
    """Per-group (s1, s2) of all weights' groups, concatenated: [groups, 2] (accumulation dtype)."""
    return engine.group_stats(_backend(backend), weights, _specs(weights, groups))


@group_stats_op.register_fake
def _(weights, groups, backend):
    return weights[0].new_empty((_total_groups(weights, groups), 2), dtype=_acc_dtype(weights))


@_op("add_coefficient_grad_", mutates_args=("grads",))
def add_coefficient_grad_op(
    grads: List[Tensor],
    weights: List[Tensor],
    coefs: Tensor,
    groups: str,
    strength: float,
    backend: str,
) -> None:
    """grads[i] += strength * (a_g sign(w) + b_g w) for given coefs [groups, 2] = (a_g, b_g)."""
    engine.add_coefficient_grad(
        _backend(backend), grads, weights, coefs, _specs(weights, groups), strength
    )


@add_coefficient_grad_op.register_fake
def _(grads, weights, coefs, groups, strength, backend):
    return None


# --- coupled groups -----------------------------------------------------------------------------


@_op("coupled_penalty", mutates_args=())
def coupled_penalty_op(
    weights: List[Tensor],
    slice_groups: Tensor,
    groups: str,
    group_counts: List[int],
    kind: str,
    alpha: float,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """(value, per-slice coefficients) of a penalty over coupled groups."""
    return engine.coupled_penalty_forward(
        _backend(backend),
        weights,
        _specs(weights, groups),
        slice_groups,
        group_counts,
        kind,
        alpha,
    )


@coupled_penalty_op.register_fake
def _(weights, slice_groups, groups, group_counts, kind, alpha, backend):
    coefs = weights[0].new_empty((_total_groups(weights, groups), 2), dtype=COEFFICIENT_DTYPE)
    return _scalar(weights), coefs


_autograd(
    coupled_penalty_op,
    _backward,
    lambda ctx, inputs, output: _setup_context(ctx, inputs, output, 2, 6),
)


@_op("add_coupled_penalty_grad_", mutates_args=("grads",))
def add_coupled_penalty_grad_op(
    grads: List[Tensor],
    weights: List[Tensor],
    slice_groups: Tensor,
    groups: str,
    group_counts: List[int],
    kind: str,
    alpha: float,
    strength: float,
    backend: str,
) -> Tensor:
    return engine.add_coupled_penalty_grad(
        _backend(backend),
        grads,
        weights,
        _specs(weights, groups),
        slice_groups,
        group_counts,
        kind,
        alpha,
        strength,
    )


@add_coupled_penalty_grad_op.register_fake
def _(grads, weights, slice_groups, groups, group_counts, kind, alpha, strength, backend):
    return _scalar(weights)


@_op("coupled_group_norms", mutates_args=())
def coupled_group_norms_op(
    weights: List[Tensor], slice_groups: Tensor, groups: str, group_counts: List[int], backend: str
) -> Tensor:
    return engine.coupled_group_norms(
        _backend(backend), weights, _specs(weights, groups), slice_groups, group_counts
    )


@coupled_group_norms_op.register_fake
def _(weights, slice_groups, groups, group_counts, backend):
    return weights[0].new_empty((sum(group_counts),), dtype=_acc_dtype(weights))


# --- proximal steps -----------------------------------------------------------------------------


@_op("prox_", mutates_args=("weights",))
def prox_op(
    weights: List[Tensor], groups: str, kind: str, t_elem: float, t_group: float, backend: str
) -> Tensor:
    """Threshold in place; the flat bool mask of groups with a nonzero left."""
    return engine.prox_(_backend(backend), weights, _specs(weights, groups), kind, t_elem, t_group)


@prox_op.register_fake
def _(weights, groups, kind, t_elem, t_group, backend):
    return weights[0].new_empty((_total_groups(weights, groups),), dtype=torch.bool)


@_op("coupled_prox_", mutates_args=("weights",))
def coupled_prox_op(
    weights: List[Tensor],
    slice_groups: Tensor,
    groups: str,
    group_counts: List[int],
    kind: str,
    threshold: float,
    backend: str,
) -> Tensor:
    """group_lasso / group_l0 on coupled groups in place; kept mask [coupled groups]."""
    return engine.coupled_prox_(
        _backend(backend),
        weights,
        _specs(weights, groups),
        slice_groups,
        group_counts,
        kind,
        threshold,
    )


@coupled_prox_op.register_fake
def _(weights, slice_groups, groups, group_counts, kind, threshold, backend):
    return weights[0].new_empty((sum(group_counts),), dtype=torch.bool)


@_op("scale_groups_", mutates_args=("weights",))
def scale_groups_op(weights: List[Tensor], groups: str, factors: Tensor, backend: str) -> None:
    """w_g *= factors[g] in place over the flat groups of `weights`."""
    engine.scale_groups_(_backend(backend), weights, _specs(weights, groups), factors)


@scale_groups_op.register_fake
def _(weights, groups, factors, backend):
    return None


@_op("coupled_scale_groups_", mutates_args=("weights",))
def coupled_scale_groups_op(
    weights: List[Tensor],
    slice_groups: Tensor,
    groups: str,
    group_counts: List[int],
    factors: Tensor,
    backend: str,
) -> None:
    """Each coupled group's slices times its factor, in place."""
    engine.coupled_scale_groups_(
        _backend(backend), weights, _specs(weights, groups), slice_groups, group_counts, factors
    )


@coupled_scale_groups_op.register_fake
def _(weights, slice_groups, groups, group_counts, factors, backend):
    return None


# The step op's schema takes the options as a family name and a flat float list: the fields of
# the family's NamedTuple in order, floats for the flags too. Rebuilt inside the op with each
# field's own type.
_STEP_FAMILIES = {cls.family: cls for cls in (SGDStepOptions, AdamStepOptions)}
_STEP_FIELD_TYPES = {
    method: tuple(typing.get_type_hints(cls)[name] for name in cls._fields)
    for method, cls in _STEP_FAMILIES.items()
}


def step_prox(
    weights, grads, states, groups: str, options: StepOptions, kind, t_elem, t_group, backend
) -> Tensor:
    """step_prox_op on typed options (`SGDStepOptions`, `AdamStepOptions`)."""
    method, values = step_op_options(options)
    return call(
        step_prox_op, weights, grads, states, groups, method, values, kind, t_elem, t_group,
        backend,
    )  # fmt: skip


def step_op_options(options: StepOptions) -> Tuple[str, List[float]]:
    """The (method, options) arguments of step_prox_op for typed options: the one place they are
    flattened (`_step_options` rebuilds them inside the op)."""
    return options.family, [float(v) for v in options]


def _step_options(method: str, values: List[float]) -> StepOptions:
    """The typed options of step_prox_op's (method, options), as `step_op_options` made them."""
    types = _STEP_FIELD_TYPES[method]
    return _STEP_FAMILIES[method]._make(field_type(v) for field_type, v in zip(types, values))


@_op("step_prox_", mutates_args=("weights", "states"))
def step_prox_op(
    weights: List[Tensor],
    grads: List[Tensor],
    states: List[Tensor],
    groups: str,
    method: str,
    options: List[float],
    kind: str,
    t_elem: float,
    t_group: float,
    backend: str,
) -> Tensor:
    """An optimizer step and the prox in one pass; the flat kept mask, or an empty tensor where
    the backend has no such pass for these tensors (nothing is then modified).

    `states` holds each tensor's state buffers, state by state (SGD: the momentum buffers;
    Adam: the first moments, then the second); `method` ("sgd", "adam") and `options` the step
    options as `step_op_options` flattens them."""
    per_state = len(states) // max(len(weights), 1)
    by_tensor = [states[i :: len(weights)][:per_state] for i in range(len(weights))]
    kept = engine.step_prox_(
        _backend(backend), weights, grads, by_tensor, _specs(weights, groups),
        _step_options(method, options), kind, t_elem, t_group,
    )  # fmt: skip
    if kept is None:
        return weights[0].new_zeros((0,), dtype=torch.bool)
    return kept


@step_prox_op.register_fake
def _(weights, grads, states, groups, method, options, kind, t_elem, t_group, backend):
    return weights[0].new_empty((_total_groups(weights, groups),), dtype=torch.bool)


# --- ops with Triton kernels only --------------------------------------------------------------
# Feature flow and selective weight decay: their "torch" backend is the oracle, which the public
# functions (fastsparse/functional) call without going through these ops.


# --- feature flow: value (differentiable), gradient, value and gradient in one pass ------------


@_op("feature_flow", mutates_args=())
def feature_flow_op(
    features: List[Tensor], gradient_weight: float, curvature_weight: float, backend: str
) -> Tensor:
    """R = a sum ||D_l||^2 + b sum ||C_l||^2 of same-shape, same-stride dense maps (0-dim).

    The weights are per element (the caller divides by numel for reduction "mean").
    """
    module = op_kernels("feature_flow", backend)
    return module.value(features, gradient_weight, curvature_weight)


@feature_flow_op.register_fake
def _(features, gradient_weight, curvature_weight, backend):
    return features[0].new_empty((), dtype=_acc_dtype(features))


@_op("feature_flow_backward", mutates_args=())
def feature_flow_backward_op(
    features: List[Tensor],
    grad_value: Tensor,
    gradient_weight: float,
    curvature_weight: float,
    backend: str,
) -> List[Tensor]:
    """grad_value * dR/dF_l for every map, in the maps' dtype and strides."""
    module = op_kernels("feature_flow", backend)
    return module.grads(features, grad_value, gradient_weight, curvature_weight)


@feature_flow_backward_op.register_fake
def _(features, grad_value, gradient_weight, curvature_weight, backend):
    return [
        torch.empty_strided(f.shape, f.stride(), dtype=f.dtype, device=f.device) for f in features
    ]


def _feature_flow_setup_context(ctx, inputs, output):
    features, gradient_weight, curvature_weight, backend = inputs
    ctx.save_for_backward(*features)
    ctx.options = (gradient_weight, curvature_weight, backend)


def _feature_flow_backward(ctx, grad_value):
    # The gradient is recomputed from the saved maps (one more read, no extra memory held
    # between forward and backward); `feature_flow_value_and_grads` does both in one pass.
    features = list(ctx.saved_tensors)
    grads = _in_backward(ctx, feature_flow_backward_op, features, grad_value, *ctx.options)
    return grads, None, None, None


_autograd(feature_flow_op, _feature_flow_backward, _feature_flow_setup_context)


@_op("feature_flow_value_and_grads", mutates_args=())
def feature_flow_value_and_grads_op(
    features: List[Tensor], gradient_weight: float, curvature_weight: float, backend: str
) -> Tuple[Tensor, List[Tensor]]:
    """(R, [dR/dF_l]) in one pass: every map read once, every gradient written once."""
    module = op_kernels("feature_flow", backend)
    return module.value_and_grads(features, gradient_weight, curvature_weight)


@feature_flow_value_and_grads_op.register_fake
def _(features, gradient_weight, curvature_weight, backend):
    value = features[0].new_empty((), dtype=_acc_dtype(features))
    grads = [
        torch.empty_strided(f.shape, f.stride(), dtype=f.dtype, device=f.device) for f in features
    ]
    return value, grads


# --- selective weight decay (in place on the gradients) ----------------------------------------


@_op("selective_decay_", mutates_args=("grads",))
def selective_decay_op(
    grads: List[Tensor],
    weights: List[Tensor],
    thresholds: Tensor,
    threshold_index: List[int],
    strength: float,
    relevance: str,
    keep_loss_grad: bool,
    backend: str,
) -> Tensor:
    """Extra decay on the irrelevant weights' gradients, in place; returns their count (int64)."""
    module = op_kernels("selective_decay", backend)
    return module.selective_decay_(
        grads, weights, thresholds, threshold_index, strength, relevance, keep_loss_grad
    )


@selective_decay_op.register_fake
def _(grads, weights, thresholds, threshold_index, strength, relevance, keep_loss_grad, backend):
    return weights[0].new_empty((), dtype=torch.int64)
