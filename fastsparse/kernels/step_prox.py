"""Fused Triton optimizer step and prox: one read and one write of each weight, gradient and
optimizer state, per group.

A program takes whole groups (classes whose groups fit one block): it loads the weights, the
gradients and the state (SGD's momentum buffer; Adam's two moments), computes the optimizer's
update in the accumulation dtype as torch.optim.SGD / Adam / AdamW do, applies the prox's
element stage, takes the group norm of the result in registers, multiplies by the group factor
and stores. Split classes are not served: the engine then runs the step and the prox apart.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsparse.core.contract import PROX_IDS, accumulation_dtype
from fastsparse.core.layout import Plan
from fastsparse.kernels.common import (
    F_OUT_ROW,
    TL_DTYPES,
    address_table,
    class_tables,
    grad_addresses,
    locate,
    num_warps,
    table_field,
    tile,
    weight_pointer,
)
from fastsparse.kernels.prox import element_step, prox_factor

_METHODS = {"sgd": 0, "adam": 1}


@triton.jit
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
    o1,
    o2,
    o3,
    o4,
    o5,
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
):
    segment, local_item = locate(item_starts_ptr, num_segments, search_steps)
    g, _, offsets, group_mask, mask = tile(table_ptr, segment, local_item, BLOCK_G, BLOCK_K)
    w_ptr = weight_pointer(table_ptr, segment, W_DTYPE)
    grad_ptr = tl.load(grad_addresses_ptr + segment).to(tl.pointer_type(W_DTYPE))
    x = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    d = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    if METHOD == 0:  # SGD: o1 momentum, o2 1 - dampening, o3 weight decay
        d = d + o3 * x
        if HAS_STATE:
            buf_ptr = tl.load(first_state_ptr + segment).to(tl.pointer_type(W_DTYPE))
            if FIRST:
                b = d
            else:
                b = o1 * tl.load(buf_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
                b = b + o2 * d
            tl.store(buf_ptr + offsets, b.to(W_DTYPE), mask=mask)
            if NESTEROV:
                d = d + o1 * b
            else:
                d = b
        y = x - lr * d
    else:  # Adam: o1 1 - beta1, o2 beta2, o3 1 - beta2, o4 eps, o5 weight decay (AdamW: decoupled)
        if DECOUPLED:
            x = x * (1.0 - lr * o5)
        else:
            d = d + o5 * x
        m_ptr = tl.load(first_state_ptr + segment).to(tl.pointer_type(W_DTYPE))
        v_ptr = tl.load(second_state_ptr + segment).to(tl.pointer_type(W_DTYPE))
        m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        v = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        m = m + o1 * (d - m)  # lerp, as torch's for weights below 0.5
        v = o2 * v + o3 * d * d
        tl.store(m_ptr + offsets, m.to(W_DTYPE), mask=mask)
        tl.store(v_ptr + offsets, v.to(W_DTYPE), mask=mask)
        y = x - step_size * (m / (tl.sqrt(v) / bias2_sqrt + o4))
    y = element_step(y, t_elem, KIND)
    if KIND >= 2:
        factor = prox_factor(tl.sqrt(tl.sum(y * y, axis=1)), t_group, KIND)
        y = y * factor[:, None]
    tl.store(w_ptr + offsets, y.to(W_DTYPE), mask=mask)
    out = out_ptr + (table_field(table_ptr, segment, F_OUT_ROW) + g) * 2
    tl.store(out, tl.sum(tl.abs(y), axis=1), mask=group_mask)
    tl.store(out + 1, tl.sum(y * y, axis=1), mask=group_mask)


def step_prox(
    plan: Plan, tensors, grads, states, method: str, options: dict, kind, t_elem, t_group
):
    """The optimizer step and the prox in one launch per class; [total_groups, 2] (s1, s2) after
    it, or None where a class's groups do not fit one block (nothing is then modified)."""
    if any(cls.split for cls in plan.classes):
        return None
    after = torch.zeros((plan.total_groups, 2), dtype=torch.float64, device=plan.device)
    roles = [list(r) for r in zip(*states)] if states and states[0] else []  # state by state
    o = options
    # One minus a coefficient is computed here, in double: the kernel's float arguments are
    # fp32, and 1 - 0.999 in fp32 is 1.3e-5 off.
    if method == "sgd":
        values = (o["lr"], o["momentum"], 1.0 - o["dampening"], o["weight_decay"], 0.0, 0.0, 0.0,
                  1.0)  # fmt: skip
        flags = dict(HAS_STATE=o["momentum"] != 0, FIRST=bool(o["first"]),
                     NESTEROV=bool(o["nesterov"]), DECOUPLED=False)  # fmt: skip
    else:
        values = (o["lr"], 1.0 - o["beta1"], o["beta2"], 1.0 - o["beta2"], o["eps"],
                  o["weight_decay"], o["step_size"], o["bias2_sqrt"])  # fmt: skip
        flags = dict(HAS_STATE=True, FIRST=False, NESTEROV=False, DECOUPLED=bool(o["decoupled"]))
    for cls in plan.classes:
        tables = class_tables(plan, cls)
        grad_table = grad_addresses(plan, cls, grads)
        first = grad_addresses(plan, cls, roles[0], "state0") if roles else grad_table
        second = grad_addresses(plan, cls, roles[1], "state1") if len(roles) > 1 else first
        _step_prox_kernel[(tables["num_items"],)](
            address_table(plan, cls, tensors),
            tables["item_starts"],
            len(cls.segments),
            tables["search_steps"],
            grad_table,
            first,
            second,
            after,
            *(float(v) for v in values),
            float(t_elem),
            float(t_group),
            W_DTYPE=TL_DTYPES[cls.dtype],
            ACC_DTYPE=TL_DTYPES[accumulation_dtype(cls.dtype)],
            METHOD=_METHODS[method],
            KIND=PROX_IDS[kind],
            **flags,
            BLOCK_G=cls.block_groups,
            BLOCK_K=cls.block_size,
            num_warps=num_warps(cls),
        )
    return after
