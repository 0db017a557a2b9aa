"""Fused Triton optimizer step and prox: one read and one write of each weight, gradient and
optimizer state, per group.

A program takes whole groups (classes whose groups are not split): tile by tile it loads the
weights, the gradients and the state (SGD's momentum buffer; Adam's two moments), computes the
optimizer's update in the accumulation dtype as torch.optim.SGD / Adam / AdamW do, applies the
prox's element stage and sums the group's squares; then it multiplies by the group factor (fp64,
from exactly scaled sums) and stores: in registers for a one-tile group, else re-reading the
new weights from cache. Split classes are not served: the engine then runs the step and the prox
apart.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsparse.backends.triton.common import (
    F_OUT_ROW,
    TL_DTYPES,
    address_table,
    class_tables,
    exact_stats,
    grad_addresses,
    launch_options,
    launch_vec,
    load_tile,
    locate,
    num_warps,
    scalar,
    scalar_arg,
    table_field,
    tile,
    tile_offsets,
    typed_pointer,
    weight_pointer,
)
from fastsparse.backends.triton.prox import element_step, prox_factor
from fastsparse.core.contract import (
    PROX_IDS,
    AdamStepOptions,
    SGDStepOptions,
    StepOptions,
    accumulation_dtype,
)
from fastsparse.core.layout import Plan

_METHODS = {SGDStepOptions: 0, AdamStepOptions: 1}
# The kernel's float arguments; each family sets its own, the others are 0 (never read).
_SCALARS = ("lr", "weight_decay", "momentum", "one_minus_dampening", "one_minus_beta1", "beta2",
            "one_minus_beta2", "eps", "step_size", "bias2_sqrt")  # fmt: skip


@triton.jit
def _step_tile(
    w_ptr,
    grad_ptr,
    first_ptr,
    second_ptr,
    offsets,
    mask,
    lr,
    weight_decay,
    momentum,
    one_minus_dampening,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bias2_sqrt,
    t,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    METHOD: tl.constexpr,
    KIND: tl.constexpr,
    HAS_STATE: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    DECOUPLED: tl.constexpr,
):
    """One tile's optimizer step (its state stored) and the prox's element step: the new weights
    before the group factor, in ACC_DTYPE."""
    x = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    d = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if METHOD == 0:  # SGD; first_ptr: the momentum buffer (FIRST: it starts as the gradient)
        d = d + weight_decay * x
        if HAS_STATE:
            if FIRST:
                b = d
            else:
                b = momentum * tl.load(first_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
                b = b + one_minus_dampening * d
            tl.store(first_ptr + offsets, b.to(W_DTYPE), mask=mask)
            if NESTEROV:
                d = d + momentum * b
            else:
                d = b
        y = x - lr * d
    else:  # Adam; first_ptr: the first moments m, second_ptr: the second moments v
        if DECOUPLED:
            x = x * (1.0 - lr * weight_decay)
        else:
            d = d + weight_decay * x
        m = tl.load(first_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        v = tl.load(second_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        m = m + one_minus_beta1 * (d - m)  # lerp, as torch's for weights below 0.5
        v = beta2 * v + one_minus_beta2 * d * d
        tl.store(first_ptr + offsets, m.to(W_DTYPE), mask=mask)
        tl.store(second_ptr + offsets, v.to(W_DTYPE), mask=mask)
        # IEEE square root and division, as torch's step (fp32 tl.sqrt and / are approximate)
        if ACC_DTYPE == tl.float32:
            denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
            y = x - step_size * tl.div_rn(m, denom)
        else:
            y = x - step_size * (m / (tl.sqrt(v) / bias2_sqrt + eps))
    return element_step(y, t, KIND)


@triton.jit(do_not_specialize=[*_SCALARS, "t_elem", "t_group"])
def _step_prox_kernel(
    table_ptr,
    item_starts_ptr,
    num_segments,
    search_steps,
    grad_addresses_ptr,
    first_state_ptr,
    second_state_ptr,
    out_ptr,
    lr,
    weight_decay,
    momentum,
    one_minus_dampening,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bias2_sqrt,
    t_elem,
    t_group,
    W_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    METHOD: tl.constexpr,
    KIND: tl.constexpr,
    HAS_STATE: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    DECOUPLED: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LOOPS: tl.constexpr,
    VEC: tl.constexpr,
    ADJACENT: tl.constexpr,
):
    lr = scalar(lr, ACC_DTYPE)
    weight_decay = scalar(weight_decay, ACC_DTYPE)
    momentum = scalar(momentum, ACC_DTYPE)
    one_minus_dampening = scalar(one_minus_dampening, ACC_DTYPE)
    one_minus_beta1 = scalar(one_minus_beta1, ACC_DTYPE)
    beta2 = scalar(beta2, ACC_DTYPE)
    one_minus_beta2 = scalar(one_minus_beta2, ACC_DTYPE)
    eps = scalar(eps, ACC_DTYPE)
    step_size = scalar(step_size, ACC_DTYPE)
    bias2_sqrt = scalar(bias2_sqrt, ACC_DTYPE)
    t = scalar(t_elem, ACC_DTYPE)
    t_group = scalar(t_group, tl.float64)
    segment, local_item = locate(item_starts_ptr, num_segments, search_steps)
    g, _, offsets, group_mask, mask = tile(
        table_ptr, segment, local_item, 0, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
    )
    w_ptr = weight_pointer(table_ptr, segment, W_DTYPE, VEC)
    grad_ptr = typed_pointer(tl.load(grad_addresses_ptr + segment), W_DTYPE, VEC)
    first_ptr = typed_pointer(tl.load(first_state_ptr + segment), W_DTYPE, VEC)
    second_ptr = typed_pointer(tl.load(second_state_ptr + segment), W_DTYPE, VEC)
    if LOOPS == 1:  # the whole tile stays in registers
        y = _step_tile(
            w_ptr, grad_ptr, first_ptr, second_ptr, offsets, mask, lr, weight_decay, momentum,
            one_minus_dampening, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
            bias2_sqrt, t, W_DTYPE, ACC_DTYPE, METHOD, KIND, HAS_STATE, FIRST,
            NESTEROV, DECOUPLED,
        )  # fmt: skip
        if KIND >= 2:
            factor = prox_factor(tl.sqrt(exact_stats(y, ACC_DTYPE)[1]), t_group, KIND)
            y = y * factor.to(ACC_DTYPE)[:, None]
        tl.store(w_ptr + offsets, y.to(W_DTYPE), mask=mask)
        s1, s2 = exact_stats(y, ACC_DTYPE)
    else:  # step every tile, then (group kinds) scale the group's new weights, read from cache
        s1 = tl.zeros([BLOCK_G], dtype=tl.float64)
        s2 = tl.zeros([BLOCK_G], dtype=tl.float64)
        for step in range(LOOPS):
            offsets, mask = tile_offsets(
                table_ptr, segment, local_item, step, BLOCK_G, BLOCK_K, LOOPS, VEC, ADJACENT
            )
            y = _step_tile(
                w_ptr, grad_ptr, first_ptr, second_ptr, offsets, mask, lr, weight_decay,
                momentum, one_minus_dampening, one_minus_beta1, beta2, one_minus_beta2, eps,
                step_size, bias2_sqrt, t, W_DTYPE, ACC_DTYPE, METHOD, KIND, HAS_STATE, FIRST,
                NESTEROV, DECOUPLED,
            )  # fmt: skip
            tl.store(w_ptr + offsets, y.to(W_DTYPE), mask=mask)
            c1, c2 = exact_stats(y, ACC_DTYPE)
            s1 += c1
            s2 += c2
        if KIND >= 2:
            factor = prox_factor(tl.sqrt(s2), t_group, KIND).to(ACC_DTYPE)
            s1 = tl.zeros([BLOCK_G], dtype=tl.float64)
            s2 = tl.zeros([BLOCK_G], dtype=tl.float64)
            for step in range(LOOPS):
                y, offsets, mask = load_tile(
                    table_ptr, segment, local_item, step, w_ptr, ACC_DTYPE, BLOCK_G, BLOCK_K,
                    LOOPS, VEC, ADJACENT
                )  # fmt: skip
                y = y * factor[:, None]
                tl.store(w_ptr + offsets, y.to(W_DTYPE), mask=mask)
                c1, c2 = exact_stats(y, ACC_DTYPE)
                s1 += c1
                s2 += c2
    out = out_ptr + (table_field(table_ptr, segment, F_OUT_ROW) + g) * 2
    tl.store(out, s1, mask=group_mask)
    tl.store(out + 1, s2, mask=group_mask)


def _kernel_scalars(options: StepOptions) -> dict:
    """The kernel's float arguments (`_SCALARS`) of these options. One minus a coefficient is
    computed here, in double (1 - 0.999 in fp32 is 1.3e-5 off)."""
    scalars = dict.fromkeys(_SCALARS, 0.0)
    scalars.update(lr=options.lr, weight_decay=options.weight_decay)
    if isinstance(options, SGDStepOptions):
        scalars.update(momentum=options.momentum, one_minus_dampening=1.0 - options.dampening)
    else:
        scalars.update(
            one_minus_beta1=1.0 - options.beta1,
            beta2=options.beta2,
            one_minus_beta2=1.0 - options.beta2,
            eps=options.eps,
            step_size=options.step_size,
            bias2_sqrt=options.bias2_sqrt,
        )
    return scalars


def _flags(options: StepOptions) -> dict:
    """The kernel's constexpr flags of these options."""
    if isinstance(options, SGDStepOptions):
        return dict(HAS_STATE=options.momentum != 0, FIRST=options.first,
                    NESTEROV=options.nesterov, DECOUPLED=False)  # fmt: skip
    return dict(HAS_STATE=True, FIRST=False, NESTEROV=False, DECOUPLED=options.decoupled)


def step_prox(plan: Plan, tensors, grads, states, options: StepOptions, kind, t_elem, t_group):
    """The optimizer step of `options` (`SGDStepOptions`, `AdamStepOptions`; `states`: per
    tensor its state buffers) and the prox in one launch per class; [total_groups, 2] (s1, s2)
    after it, or None where a class's groups are split (nothing is then modified)."""
    if any(cls.split for cls in plan.classes):
        return None
    after = torch.zeros((plan.total_groups, 2), dtype=torch.float64, device=plan.device)
    roles = [list(r) for r in zip(*states)] if states and states[0] else []  # state by state
    scalars, flags = _kernel_scalars(options), _flags(options)
    for cls in plan.classes:
        tables = class_tables(plan, cls)
        grad_table = grad_addresses(plan, cls, grads)
        first = grad_addresses(plan, cls, roles[0], "state0") if roles else grad_table
        second = grad_addresses(plan, cls, roles[1], "state1") if len(roles) > 1 else first
        table = address_table(plan, cls, tensors)
        vec = launch_vec(plan, cls, "grad", *("state0", "state1")[: len(roles)])
        # fp64 kernels get every float argument as a double's bits (scalar_arg)
        _step_prox_kernel[(tables["num_items"],)](
            table,
            tables["item_starts"],
            len(cls.segments),
            tables["search_steps"],
            grad_table,
            first,
            second,
            after,
            **{name: scalar_arg(value, cls.dtype) for name, value in scalars.items()},
            t_elem=scalar_arg(t_elem, cls.dtype),
            t_group=scalar_arg(t_group, torch.float64),
            W_DTYPE=TL_DTYPES[cls.dtype],
            ACC_DTYPE=TL_DTYPES[accumulation_dtype(cls.dtype)],
            METHOD=_METHODS[type(options)],
            KIND=PROX_IDS[kind],
            **flags,
            BLOCK_G=cls.block_groups,
            BLOCK_K=cls.block_size,
            LOOPS=cls.loops,
            VEC=vec,
            ADJACENT=cls.adjacent,
            **launch_options(num_warps(cls, vec)),
        )
    return after
