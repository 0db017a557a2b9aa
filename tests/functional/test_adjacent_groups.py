"""Groups side by side in memory (the "channels" of a row-major matrix, the "filters" of a
transposed one) on every fused backend. The Triton kernels tile such groups across groups, so
neighbouring threads read neighbouring addresses (16 bytes at a time where aligned); values,
gradients, group norms, prox steps and the fused optimizer steps match the oracle, with partial
tiles of groups, masked tails, several tiles a group and split groups.
"""

from __future__ import annotations

import pytest
import torch

import fastsparse as fs
from fastsparse import reference as ref
from fastsparse.core.layout import (
    ADJACENT_GROUPS,
    SPLIT_BLOCK,
    TILE_ELEMENTS,
    build_plan,
    next_power_of_2,
)
from fastsparse.functional import adam_prox_, sgd_prox_
from tests.helpers import assert_close_to_oracle, gradient_scale, term_magnitude


def _matrix(rows, cols, transposed=False):
    def make(dtype, device, seed):
        g = torch.Generator().manual_seed(seed)
        if transposed:  # [rows, cols] with strides (1, rows): its filters are adjacent
            return torch.randn(cols, rows, generator=g, dtype=dtype).t().to(device)
        return torch.randn(rows, cols, generator=g, dtype=dtype).to(device)

    return make


# name: (make, grouping, 16-byte accesses for fp32)
CASES = {
    # 24 groups: a full tile of 16 and a partial one; 300 elements: 2 tiles, a masked tail
    "aligned": (_matrix(300, 24), "channels", True),
    "unaligned": (_matrix(300, 13), "channels", False),
    "transposed": (_matrix(300, 24, transposed=True), "filters", True),
    "split": (_matrix(SPLIT_BLOCK + 700, 3), "channels", False),  # partial sums per chunk
}
FUSED_CASES = [name for name in CASES if name != "split"]  # the fused steps decline split groups


def _tensor(name, dtype=torch.float32, device="cpu", seed=0):
    make, grouping, _ = CASES[name]
    return make(dtype, device, seed), grouping


@pytest.mark.parametrize("name", list(CASES))
def test_the_plan_tiles_across_groups(name):
    w, grouping = _tensor(name)
    plan = build_plan([w], [(0, grouping, 0)])
    (launch,) = plan.classes
    assert launch.adjacent
    assert launch.vector == (4 if CASES[name][2] else 0)
    groups = plan.segments[0].geometry.groups
    assert launch.block_groups >= min(ADJACENT_GROUPS, next_power_of_2(groups))  # all, or 16+
    assert launch.block_groups * launch.block_size <= TILE_ELEMENTS
    assert launch.split == (name == "split")


@pytest.mark.parametrize("kind", ["group_lasso", "l1l2", "group_l1l2", "hoyer_square"])
@pytest.mark.parametrize("name", list(CASES))
def test_penalty_value_and_gradient(name, kind, backend, device):
    w, grouping = _tensor(name, device=device)
    leaf = w.clone().requires_grad_(True)
    value = fs.penalty([leaf], kind, groups=grouping, backend=backend)
    value.backward()
    exact = ref.penalty([w.double()], kind, grouping)
    (exact_grad,) = ref.penalty_grad([w.double()], kind, grouping)
    same_dtype = ref.penalty([w], kind, grouping)
    (same_dtype_grad,) = ref.penalty_grad([w], kind, grouping)
    assert_close_to_oracle(value, same_dtype, exact, name="value")
    # errors scale with the gradient's terms, which may cancel (as in test_penalty.py)
    terms = torch.clamp(term_magnitude(w, kind, grouping), min=gradient_scale([exact_grad]))
    assert_close_to_oracle(leaf.grad, same_dtype_grad, exact_grad, scale=terms, name="gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_in_place_gradient(name, dtype, backend, device):
    w, grouping = _tensor(name, dtype, device, seed=1)
    w.grad = torch.zeros_like(w)
    fs.add_penalty_grad_([w], "l1l2", 0.5, groups=grouping, backend=backend)
    (same_dtype,) = ref.penalty_grad([w.detach()], "l1l2", grouping)
    (exact,) = ref.penalty_grad([w.detach().double()], "l1l2", grouping)
    terms = torch.clamp(0.5 * term_magnitude(w, "l1l2", grouping), min=gradient_scale([exact]))
    assert_close_to_oracle(w.grad, 0.5 * same_dtype, 0.5 * exact, scale=terms, name=name)


@pytest.mark.parametrize("name", list(CASES))
def test_group_norms_and_prox(name, backend, device):
    w, grouping = _tensor(name, device=device, seed=2)
    (norms,) = fs.group_norms([w], groups=grouping, backend=backend)
    (expected_norms,) = ref.group_norms([w.double()], grouping)
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=1e-6)
    ordered = expected_norms.sort().values  # half the groups die; none sits at the threshold
    threshold = ordered[len(ordered) // 2 - 1 : len(ordered) // 2 + 1].mean().item()
    for kind, t in (("group_lasso", threshold), ("l1", 0.5)):
        fused, expected = w.clone(), w.clone()
        (kept,) = fs.prox_([fused], kind, t, groups=grouping, backend=backend)
        (expected_kept,) = ref.prox_([expected], kind, t, grouping)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(kept.cpu(), expected_kept.cpu()), kind


@pytest.mark.parametrize("name", FUSED_CASES)
def test_fused_sgd_and_adam_steps(name, backend, device):
    if backend == "native" and device != "cpu":
        pytest.skip("the native fused step is CPU code (CUDA tensors take the Triton one)")
    w, grouping = _tensor(name, torch.float64, device, seed=3)
    w.grad = torch.randn_like(w)
    threshold = 0.5 * ref.group_norms([w], grouping)[0].median().item()  # fp64: exact
    options = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False)
    fused, expected = w.clone(), w.clone()
    fused.grad, expected.grad = w.grad.clone(), w.grad.clone()
    bufs = [torch.empty_like(w)]
    masks = sgd_prox_([fused], "group_lasso", threshold, bufs=bufs, first=True, groups=grouping,
                      backend=backend, **options)  # fmt: skip
    expected_masks, expected_bufs = ref.sgd_prox_([expected], None, options, "group_lasso",
                                                  threshold, grouping)  # fmt: skip
    assert masks is not None, "the fused SGD step declined"
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bufs[0], expected_bufs[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(masks[0], expected_masks[0])

    adam = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, decoupled=True)
    moments = [torch.zeros_like(w), torch.zeros_like(w)]
    expected_moments = [torch.zeros_like(w), torch.zeros_like(w)]
    masks = adam_prox_([fused], "group_lasso", threshold, step=1, exp_avgs=moments[:1],
                       exp_avg_sqs=moments[1:], groups=grouping, backend=backend,
                       **adam)  # fmt: skip
    expected_masks = ref.adam_prox_([expected], expected_moments[:1], expected_moments[1:], adam,
                                    1, "group_lasso", threshold, grouping)  # fmt: skip
    assert masks is not None, "the fused Adam step declined"
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    for m, e in zip(moments, expected_moments):
        torch.testing.assert_close(m, e, rtol=1e-12, atol=1e-12)
    assert torch.equal(masks[0], expected_masks[0])
