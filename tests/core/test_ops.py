"""The torch.library ops of fastsparse.ops: opcheck (schemas, fake kernels, autograd
registration) of every op on every fused backend, and the values of the two primitive ops the
sharded path is built from."""

import pytest
import torch

from fastsparse import ops  # noqa: F401  (registers torch.ops.fastsparse)
from fastsparse import reference as ref
from fastsparse.core.contract import AdamStepOptions, SGDStepOptions
from tests.helpers import decay_params, feature_maps, two_weights

# ------------------------------------------------------------------------------------------------
# The penalty ops
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1l2", "group_hoyer_square"])
def test_opcheck_penalty(kind, device, backend):
    result = torch.library.opcheck(
        torch.ops.fastsparse.penalty.default,
        (two_weights(device), kind, "filters,channels", 0.5, backend),
    )
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_backward_inplace_and_norms(device, backend):
    weights = [w.detach() for w in two_weights(device)]
    _, coefs = torch.ops.fastsparse.penalty(weights, "l1l2", "filters", 0.5, backend)
    grad_value = torch.tensor(2.0, device=device)
    checks = [
        (
            torch.ops.fastsparse.penalty_backward_flat.default,
            (weights, coefs, grad_value, "filters", backend),
        ),
        (
            torch.ops.fastsparse.add_penalty_grad_.default,
            (
                [torch.zeros_like(w) for w in weights],
                weights,
                "group_lasso",
                "channels",
                0.5,
                0.1,
                "triton",
            ),
        ),
        (torch.ops.fastsparse.group_norms.default, (weights, "kernels", backend)),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# ------------------------------------------------------------------------------------------------
# The primitives of the sharded path: group statistics and the coefficient gradient
# ------------------------------------------------------------------------------------------------


def test_opcheck_group_stats_and_coefficient_grad(device, backend):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, 3, 3, generator=gen).to(device), torch.randn(4, 6).to(device)]
    groups = "filters,channels"
    stats = torch.ops.fastsparse.group_stats(weights, groups, backend)
    expected = [
        torch.stack(ref.group_stats(w, g), 1) for w in weights for g in ("filters", "channels")
    ]
    torch.testing.assert_close(stats, torch.cat(expected))
    coefs = torch.randn(stats.shape, generator=gen).to(device)
    checks = [
        (torch.ops.fastsparse.group_stats.default, (weights, groups, backend)),
        (
            torch.ops.fastsparse.add_coefficient_grad_.default,
            ([torch.zeros_like(w) for w in weights], weights, coefs, groups, 0.5, backend),
        ),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)
    grads = [torch.ones_like(w) for w in weights]
    torch.ops.fastsparse.add_coefficient_grad_(grads, weights, coefs, groups, 0.5, backend)
    rows = iter(torch.split(coefs, [len(e) for e in expected]))
    for w, g in zip(weights, grads):
        want = torch.ones_like(w)
        for grouping in ("filters", "channels"):
            c = next(rows)
            x = ref.grouped_view(w, grouping)
            update = c[:, :1] * torch.sign(x) + c[:, 1:] * x
            want += 0.5 * (
                update.reshape(w.shape)
                if grouping == "filters"
                else update.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1)
            )
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Feature flow and selective decay
# ------------------------------------------------------------------------------------------------


def test_opcheck_feature_flow(device):
    features = feature_maps(4, (3, 5), device=device)
    grad_value = torch.tensor(1.5, device=device)
    checks = [
        (torch.ops.fastsparse.feature_flow.default, (features, 0.5, 0.25, "triton")),
        (
            torch.ops.fastsparse.feature_flow_backward.default,
            (features, grad_value, 0.5, 0.25, "triton"),
        ),
        (
            torch.ops.fastsparse.feature_flow_value_and_grads.default,
            (features, 0.5, 0.25, "triton"),
        ),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_opcheck_selective_decay(device):
    ps = decay_params(device=device, seed=5)
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


# ------------------------------------------------------------------------------------------------
# The proximal ops: the prox, group scaling, the SGD step fused with the prox
# ------------------------------------------------------------------------------------------------


def test_opcheck_prox_and_scale_groups(device, backend):
    weights = [w.detach().clone() for w in two_weights(device)]
    factors = torch.rand(sum(w.shape[0] for w in weights), dtype=torch.float64, device=device)
    prox = (weights, "filters", "group_lasso", 0.0, 0.1, backend)
    checks = [
        (torch.ops.fastsparse.prox_.default, prox),
        (torch.ops.fastsparse.scale_groups_.default, (weights, "filters", factors, backend)),
    ]
    for op, args in checks:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_opcheck_step_prox(method, device, backend):
    if backend == "native" and device != "cpu":
        pytest.skip("the native fused step is CPU code")
    weights = [w.detach().clone() for w in two_weights(device)]
    grads = [torch.randn_like(w) for w in weights]
    states = [torch.zeros_like(w) for _ in range(1 if method == "sgd" else 2) for w in weights]
    if method == "sgd":
        options = SGDStepOptions(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                                 nesterov=False, first=False)  # fmt: skip
    else:
        options = AdamStepOptions.at_step(3, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=0.01, decoupled=True)  # fmt: skip
    args = (weights, grads, states, "filters", *ops.step_op_options(options), "group_lasso",
            0.0, 0.05, backend)  # fmt: skip
    result = torch.library.opcheck(torch.ops.fastsparse.step_prox_.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_step_options_cross_the_op_boundary_unchanged(method, monkeypatch):
    """Flattened into the op's float list and rebuilt inside it: the same NamedTuple, each
    field of its own type (the flags bools again), reaching the engine."""
    if method == "sgd":
        options = SGDStepOptions(lr=0.1, momentum=0.9, dampening=0.25, weight_decay=1e-4,
                                 nesterov=False, first=True)  # fmt: skip
    else:
        options = AdamStepOptions.at_step(3, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=0.01, decoupled=False)  # fmt: skip
    received = []

    def engine_step(backend, tensors, grads, states, specs, options, *rest):
        received.append(options)
        return None

    monkeypatch.setattr(ops.engine, "step_prox_", engine_step)
    w = torch.randn(4, 3)
    states = [torch.zeros_like(w) for _ in range(1 if method == "sgd" else 2)]
    kept = ops.step_prox([w], [torch.randn_like(w)], states, "filters", options, "group_lasso",
                         0.0, 0.1, "native")  # fmt: skip
    assert kept.numel() == 0  # the engine declined: nothing written
    (got,) = received
    assert got == options and type(got) is type(options)
    assert [type(v) for v in got] == [type(v) for v in options]


# ------------------------------------------------------------------------------------------------
# Device guard
# ------------------------------------------------------------------------------------------------


def test_ops_find_the_cuda_device_of_their_tensors():
    # The guard reads the device of the first tensor argument (or first list element).
    w = torch.zeros(2, 3)
    assert ops._cuda_device_of(([w], "l1", 0.5)) is None
    assert ops._cuda_device_of((None, 1.0, w)) is None
    assert ops._cuda_device_of(([], 1.0)) is None


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("backend", ["triton", "native"])
def test_tensors_on_another_gpu_than_the_current_one(backend):
    import fastsparse as fs

    w = torch.randn(8, 3, 3, 3, device="cuda:1")
    expected = ref.penalty_grad(w.cpu(), "group_lasso")[0]
    with torch.cuda.device(0):
        param = w.clone().requires_grad_(True)
        fs.add_penalty_grad_(param, "group_lasso", 1.0, backend=backend)
        fs.prox_(w, "group_lasso", 0.1, backend=backend)
    torch.testing.assert_close(param.grad.cpu(), expected, rtol=1e-5, atol=1e-6)
