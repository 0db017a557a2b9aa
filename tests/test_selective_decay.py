"""Selective weight decay: the oracle's rule, the fused Triton pass against it (dtypes, layouts,
thresholds, counts), the update as the gradient of its penalty (float64), the regularizer object,
the iterative pruning schedule, the op, and large shapes on a GPU (`gpu`)."""

import pytest
import torch
from torch import nn

from fastsparse import reference as ref
from fastsparse.core import ops  # noqa: F401  (registers torch.ops.fastsparse)
from fastsparse.functional.selective_decay import relevance_thresholds, selective_decay_
from fastsparse.methods.selective_decay import (
    IterativePruning,
    SelectiveWeightDecay,
    selective_decay_regularizer,
)

SHAPES = [(5, 3, 3, 3), (7,), (1, 1), (4100,), (13, 9)]


def params(shapes=SHAPES, dtype=torch.float32, grad_dtype=None, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
        p.requires_grad_(True)
        if grad_dtype not in (None, dtype) and hasattr(p, "grad_dtype"):
            p.grad_dtype = grad_dtype  # torch >= 2.10 checks .grad's dtype unless told otherwise
        p.grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(
            device, grad_dtype or dtype
        )
        out.append(p)
    return out


def assert_same_update(actual, expected):
    """The same fp32 (fp64) arithmetic as the oracle, rounded once to the gradient's dtype; a GPU
    may contract g + lambda * w into one fma, so allow an ulp of the result and of lambda * w."""
    eps = torch.finfo(actual.dtype).eps
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=eps, atol=eps * scale)


def run_oracle(ps, thresholds, strength, relevance, keep):
    return ref.selective_decay_grad(
        [p.detach() for p in ps], [p.grad for p in ps], thresholds, strength, relevance, keep
    )


# --------------------------------------------------------------------------------- the oracle


def test_oracle_rule_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    g = torch.tensor([0.1, 1.0, -0.1, 0.0])  # relevances 0.1, 2, 0.3, 0
    new, (mask,) = ref.selective_decay_grad([w], [g], torch.tensor([0.3]), 0.5)
    assert mask.tolist() == [True, False, True, True]
    torch.testing.assert_close(new[0], torch.tensor([0.6, 1.0, 1.4, 0.25]))
    new, _ = ref.selective_decay_grad([w], [g], torch.tensor([0.3]), 0.5, keep_loss_grad=False)
    torch.testing.assert_close(new[0], torch.tensor([0.5, 1.0, 1.5, 0.25]))
    new, (mask,) = ref.selective_decay_grad([w], [g], torch.tensor([1.0]), 0.5, "magnitude")
    assert mask.tolist() == [True, False, False, True]


def test_quantile_threshold_selects_exactly_k():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.1, 0.37, 0.5, 1.0):
        tau = ref.quantile_threshold(scores, q)
        assert int((scores <= tau).sum()) == int(q * 1000 + 1e-9)


def test_thresholds_leave_zero_weights_out_and_scopes():
    w = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    g = torch.ones(6)
    (tau,) = ref.relevance_thresholds([w], [g], 0.5)  # of the 4 nonzero: 1, 2
    assert tau.item() == 2.0
    w2 = torch.tensor([10.0, 20.0])
    taus = ref.relevance_thresholds([w, w2], [g, torch.ones(2)], 0.5, scope="tensor")
    assert taus.tolist() == [2.0, 10.0]
    taus = ref.relevance_thresholds([w, w2], [g, torch.ones(2)], 0.5, scope="global")
    assert taus.tolist() == [3.0, 3.0]


def test_update_is_the_gradient_of_the_penalty_float64(device):
    """The fused update adds exactly d/dw of strength/2 * sum_{irrelevant} w^2 (float64)."""
    ps = params(dtype=torch.float64, device=device, seed=1)
    grads0 = [p.grad.clone() for p in ps]
    taus = relevance_thresholds(ps, 0.4, scope="tensor")
    _, masks = run_oracle(ps, taus, 0.3, "taylor", True)
    selective_decay_(ps, 0.3, threshold=taus, backend="triton")
    leaves = [p.detach().clone().requires_grad_(True) for p in ps]
    penalty = ref.selective_decay_penalty(leaves, masks, 0.3)
    expected = torch.autograd.grad(penalty, leaves)
    for p, g0, e in zip(ps, grads0, expected):
        torch.testing.assert_close(p.grad - g0, e, rtol=1e-12, atol=1e-12)

    def f(*ws):
        return ref.selective_decay_penalty(list(ws), masks, 0.3)

    assert torch.autograd.gradcheck(f, tuple(leaves))


# ---------------------------------------------------------------------- fused against oracle


@pytest.mark.parametrize("keep", [True, False], ids=["keep_loss_grad", "decay_only"])
@pytest.mark.parametrize("relevance", ["taylor", "magnitude", "gradient"])
def test_fused_matches_oracle(relevance, keep, device):
    ps = params(device=device)
    taus = relevance_thresholds(ps, 0.35, relevance=relevance, scope="tensor")
    expected, masks = run_oracle(ps, taus, 0.1, relevance, keep)
    count = selective_decay_(
        ps, 0.1, threshold=taus, relevance=relevance, keep_loss_grad=keep, backend="triton"
    )
    assert count.dtype == torch.int64 and int(count) == sum(int(m.sum()) for m in masks)
    for p, e in zip(ps, expected):
        assert_same_update(p.grad, e)


@pytest.mark.parametrize(
    "dtype, grad_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float64, None)],
    ids=["bf16-fp32grad", "fp16", "fp64"],
)
def test_fused_dtypes(dtype, grad_dtype, device):
    ps = params(dtype=dtype, grad_dtype=grad_dtype, device=device, seed=2)
    expected, _ = run_oracle(ps, torch.full((len(ps),), 0.2), 0.25, "taylor", True)
    selective_decay_(ps, 0.25, threshold=0.2, backend="triton")
    for p, e in zip(ps, expected):
        assert p.grad.dtype == (grad_dtype or dtype)
        assert_same_update(p.grad, e)


def test_fused_layouts(device):
    w = torch.randn(4, 6, 3, 3, device=device).to(memory_format=torch.channels_last)
    cl = nn.Parameter(w)
    cl.grad = torch.randn(4, 6, 3, 3, device=device)  # contiguous grad: spilled
    big = torch.randn(8, 10, device=device)
    view = big[:, :5].detach().requires_grad_(True)  # not dense
    view.grad = torch.randn(8, 5, device=device)
    ps = [cl, view]
    expected, _ = run_oracle(ps, torch.full((2,), 0.3), 0.5, "taylor", True)
    grad_objects = [p.grad for p in ps]
    selective_decay_(ps, 0.5, threshold=0.3, backend="triton")
    for p, e, g in zip(ps, expected, grad_objects):
        assert p.grad is g  # updated in place
        torch.testing.assert_close(p.grad, e)


def test_quantile_and_global_scope(device):
    ps = params(device=device, seed=3)
    taus = ref.relevance_thresholds([p.detach() for p in ps], [p.grad for p in ps], 0.25)
    expected, masks = run_oracle(ps, taus, 0.1, "taylor", True)
    count = selective_decay_(ps, 0.1, quantile=0.25, backend="triton")
    total = sum(p.numel() for p in ps)
    assert int(count) == int(0.25 * total) == sum(int(m.sum()) for m in masks)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad, e)


def test_torch_backend_and_missing_grad():
    p = nn.Parameter(torch.randn(6, 4))
    count = selective_decay_([p], 0.5, threshold=0.0, backend="torch")  # grad None: zeros
    assert int(count) == 24
    torch.testing.assert_close(p.grad, 0.5 * p.detach())


# --------------------------------------------------------------------- the regularizer object


def test_regularizer_attach_and_refresh(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)
    twin = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(device)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 6, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = SelectiveWeightDecay(model, 0.2, quantile=0.5, refresh=2, backend="triton")
    reg.attach(opt)
    for step in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        # The same step by hand with the oracle.
        twin(x).square().mean().backward()
        ws = [twin[0].weight, twin[2].weight]
        if step % 2 == 0:
            taus = ref.relevance_thresholds([w.detach() for w in ws], [w.grad for w in ws], 0.5)
        new, _ = ref.selective_decay_grad([w.detach() for w in ws], [w.grad for w in ws], taus, 0.2)
        with torch.no_grad():
            for w, g in zip(ws, new):
                w.grad.copy_(g)
            for p in twin.parameters():
                p -= 0.1 * p.grad
                p.grad = None
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert reg.steps == 3 and int(reg.last_count) == (30 + 15) // 2


def test_entry_point():
    reg = selective_decay_regularizer(nn.Conv2d(3, 4, 3), 1e-3, quantile=0.3, backend="torch")
    assert isinstance(reg, SelectiveWeightDecay) and len(reg.params) == 1


# ------------------------------------------------------------------------ iterative pruning


def test_iterative_pruning_schedule_and_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    pruner = IterativePruning(model, 0.6, rounds=3, interval=2, start=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(opt)
    pruned_at = []
    for epoch in range(8):
        model(torch.randn(4, 10)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if pruner.step():
            pruned_at.append((epoch, round(pruner.sparsity(), 3)))
        for p, m in zip(pruner.params, pruner.masks):
            assert not p[~m].any()  # pruned weights stay exactly zero
    assert pruned_at == [(1, 0.2), (3, 0.4), (5, 0.6)]
    assert pruner.done
    # Magnitude: every pruned weight was the smallest at its round; the survivors are nonzero.
    assert all(p[m].abs().min() > 0 for p, m in zip(pruner.params, pruner.masks))


def test_iterative_pruning_cubic_tensor_scope_and_state():
    pruner = IterativePruning(
        [torch.randn(50), torch.randn(30)], 0.5, rounds=2, schedule="cubic", scope="tensor"
    )
    assert pruner.target(1) == pytest.approx(0.5 * (1 - 0.5**3))
    pruner.step()
    assert [int((~m).sum()) for m in pruner.masks] == [21, 13]
    state = pruner.state_dict()
    other = IterativePruning([torch.randn(50), torch.randn(30)], 0.5, rounds=2)
    other.load_state_dict(state)
    assert other.round == 1 and all(torch.equal(a, b) for a, b in zip(other.masks, pruner.masks))


def test_iterative_pruning_undoes_a_round_that_hurts():
    w = torch.arange(1.0, 11.0)
    pruner = IterativePruning([w], 0.6, rounds=3, tolerance=0.05)
    assert pruner.step(metric=0.90)  # round 1: 2 weights
    assert pruner.step(metric=0.90)  # round 2: 4 weights
    assert not pruner.step(metric=0.80)  # worse than 0.90 - 0.05: undo round 2, stop
    assert pruner.done and pruner.round == 1
    assert w.tolist() == [0.0, 0.0] + [float(v) for v in range(3, 11)]
    assert not pruner.step(metric=0.99)


def test_bad_input():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="exactly one"):
        selective_decay_([p], 0.1)
    with pytest.raises(ValueError, match="exactly one"):
        selective_decay_([p], 0.1, quantile=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="relevance"):
        selective_decay_([p], 0.1, quantile=0.5, relevance="hessian")
    with pytest.raises(ValueError, match="quantile"):
        selective_decay_([p], 0.1, quantile=1.5)
    with pytest.raises(ValueError, match="same tensor"):
        selective_decay_([p, p], 0.1, threshold=0.1)
    with pytest.raises(RuntimeError, match="no selective_decay kernel"):
        selective_decay_([p], 0.1, threshold=0.1, backend="native")
    with pytest.raises(ValueError, match="final_sparsity"):
        IterativePruning([p], 1.0)
    with pytest.raises(ValueError, match="schedule"):
        IterativePruning([p], 0.5, schedule="exp")


def test_opcheck(device):
    ps = params(device=device, seed=5)
    args = (
        [p.grad.clone() for p in ps],
        [p.detach() for p in ps],
        torch.full((len(ps),), 0.2, device=device),
        list(range(len(ps))),
        0.1,
        "taylor",
        True,
        "triton",
    )
    result = torch.library.opcheck(torch.ops.fastsparse.selective_decay_.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_large_model(dtype):
    shapes = [(512, 512, 3, 3), (4096, 4096), (11008, 4096), (1000,), (63, 1023)]
    ps = params(shapes, dtype=dtype, grad_dtype=torch.float32, device="cuda", seed=6)
    taus = relevance_thresholds(ps, 0.5)
    expected, masks = run_oracle(ps, taus, 1e-3, "taylor", True)
    count = selective_decay_(ps, 1e-3, threshold=taus, backend="triton")
    assert int(count) == sum(int(m.sum()) for m in masks)
    for p, e in zip(ps, expected):
        assert_same_update(p.grad, e)
