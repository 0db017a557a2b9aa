"""Large-model training without a cluster: a compiled training step, CUDA graphs, mixed precision.

(The distributed parts, DTensor/FSDP2 and DDP, are in tests/test_distributed.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastsparse as fs
from fastsparse import reference as ref

# --- torch.compile: a whole training step in one graph -----------------------------------------
#
# `Tensor.backward()` is traced when torch._dynamo.config.trace_autograd_ops is on. The step
# updates the parameters with foreach ops: torch.optim's `Optimizer.step` inserts graph breaks
# on purpose (pytorch/pytorch#104053), so with torch.optim compile the rest of the step and call
# `optimizer.step()` outside it.


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.fc = torch.nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def make_step(model, path: str, backend: str, lr: float = 0.1):
    """forward, loss with the penalty (autograd) or its in-place gradient, backward, SGD step."""
    params = list(model.parameters())
    weights = [model.conv.weight, model.fc.weight]

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if path == "autograd":
            loss = loss + 1e-2 * fs.penalty(weights, "l1l2", backend=backend)
            loss.backward()
        else:
            loss.backward()
            fs.add_penalty_grad_(weights, "group_hoyer_square", 1e-2, backend=backend)
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
        for p in params:
            p.grad = None
        return loss.detach()

    return step


@pytest.mark.parametrize("path", ["autograd", "inplace"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_compiled_training_step_has_no_graph_breaks(backend, path):
    torch.manual_seed(0)
    eager_model = ConvNet()
    explained_model, compiled_model = copy.deepcopy(eager_model), copy.deepcopy(eager_model)
    x, y = torch.randn(4, 2, 5, 5), torch.randn(4, 3)
    fs.penalty(eager_model.fc.weight, "l1", backend=backend)  # load the kernels outside tracing

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(make_step(explained_model, path, backend))(x, y)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(
            make_step(compiled_model, path, backend), fullgraph=True, backend="aot_eager"
        )
        compiled_losses = [compiled(x, y) for _ in range(2)]
    eager = make_step(eager_model, path, backend)
    eager_losses = [eager(x, y) for _ in range(2)]

    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for got, expected in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_step_then_torch_optim():
    """The usual split: forward + loss + backward compiled in one graph, then torch.optim's
    step (outside: it breaks graphs on purpose)."""
    torch.manual_seed(0)
    model = ConvNet()
    eager_model = copy.deepcopy(model)
    x, y = torch.randn(4, 2, 5, 5), torch.randn(4, 3)

    def loss_and_grads(m):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss = loss + 1e-2 * fs.penalty([m.conv.weight, m.fc.weight], "l1l2", backend="native")
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(loss_and_grads, fullgraph=True, backend="aot_eager")
        for m, fn in ((model, compiled), (eager_model, loss_and_grads)):
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            for _ in range(2):
                fn(m)
                opt.step()
                opt.zero_grad()
    for got, expected in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- the two primitive-level ops the sharded path is built from -------------------------------


def test_opcheck_group_stats_and_coefficient_grad(device, backend):
    from fastsparse.core import ops  # noqa: F401  (registers torch.ops.fastsparse)

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


# --- CUDA graphs: the in-place path captured once, replayed on new weights -------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["l1l2", "group_hoyer_square"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inplace_gradient_in_cuda_graph(backend, kind):
    """Static weights and gradients; warm up on a side stream (builds plans, tables and
    kernels), capture, then write new weights into the same tensors and replay."""
    torch.manual_seed(0)
    groups = ("filters", "channels")
    params = [
        torch.randn(64, 32, 3, 3, device="cuda").requires_grad_(True),
        torch.randn(96, 576, device="cuda").requires_grad_(True),
        torch.randn(64, 7, device="cuda", dtype=torch.bfloat16).requires_grad_(True),
    ]
    for p in params:
        p.grad = torch.zeros_like(p)

    def step():
        for p in params:
            p.grad.zero_()
        return fs.add_penalty_grad_(params, kind, 0.1, groups=groups, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_value = step()

    for trial in range(2):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn_like(p) * (trial + 1))
                p.grad.fill_(float("nan"))  # the replay must overwrite every element
        graph.replay()
        torch.cuda.synchronize()
        weights = [p.detach() for p in params]
        torch.testing.assert_close(
            static_value, ref.penalty(weights, kind, groups), rtol=1e-5, atol=1e-5
        )
        for p, expected in zip(params, ref.penalty_grad(weights, kind, groups)):
            tol = 2e-2 if p.dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(p.grad, 0.1 * expected, rtol=tol, atol=tol * 1e-2)


# --- mixed precision: low-precision parameters, fp32 gradients or fp32 master weights ---------


def _weights(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(6, 4, 3, 3, generator=gen).to(dtype),
        torch.randn(5, 9, generator=gen).to(dtype),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_low_precision_parameters_with_fp32_gradients(dtype, backend):
    """bf16/fp16 parameters whose .grad is fp32 (`grad_dtype`): both paths write fp32
    gradients, the in-place path the fp32 gradient of the low-precision weights."""
    params = [torch.nn.Parameter(w) for w in _weights(dtype)]
    if not hasattr(params[0], "grad_dtype"):
        pytest.skip("Tensor.grad_dtype needs a newer PyTorch")
    for p in params:
        p.grad_dtype = torch.float32
    exact = ref.penalty_grad([p.detach().double() for p in params], "l1l2")

    fs.penalty(params, "l1l2", backend=backend).backward()
    for p, e in zip(params, exact):
        assert p.grad.dtype == torch.float32
        # the autograd path computes the gradient in the weights' dtype, then casts
        torch.testing.assert_close(p.grad.double(), e, rtol=2e-2, atol=2e-2)
        p.grad = None
    value = fs.add_penalty_grad_(params, "l1l2", 1.0, backend=backend)
    assert value.dtype == torch.float32
    # The fused kernels compute in fp32 and write fp32; the oracle (backend "torch") computes
    # the gradient in the weights' dtype, then adds it.
    tol = 2e-2 if backend == "torch" else 1e-5
    for p, e in zip(params, exact):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.double(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_parameters_gradients_in_their_dtype(dtype, backend):
    """Without grad_dtype, gradients have the parameters' dtype (what a bf16 optimizer
    expects), within 2x torch's own same-dtype error of the fp64 gradient."""
    params = [torch.nn.Parameter(w) for w in _weights(dtype)]
    fs.penalty(params, "group_lasso", groups=("filters", "channels"), backend=backend).backward()
    autograd = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    fs.add_penalty_grad_(
        params, "group_lasso", 1.0, groups=("filters", "channels"), backend=backend
    )
    exact = ref.penalty_grad(
        [p.detach().double() for p in params], "group_lasso", ("filters", "channels")
    )
    same_dtype = ref.penalty_grad(
        [p.detach() for p in params], "group_lasso", ("filters", "channels")
    )
    for p, a, e, t in zip(params, autograd, exact, same_dtype):
        assert p.grad.dtype == dtype and a.dtype == dtype
        bound = 2 * (t.double() - e).abs().max() + torch.finfo(dtype).eps * e.abs().max()
        assert (a.double() - e).abs().max() <= bound
        assert (p.grad.double() - e).abs().max() <= bound


def test_fp32_master_weights():
    """bf16 model for compute, fp32 master weights in the optimizer: the penalty gradient goes
    to the master weights in fp32, exactly the fp32 gradient."""
    torch.manual_seed(0)
    model = ConvNet().to(torch.bfloat16)
    master = [p.detach().float().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.SGD(master, lr=0.1)
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16)
    for _ in range(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad.float()
            p.grad = None
        data_grads = [m.grad.clone() for m in master]
        weights = [master[0], master[2]]  # conv and fc weights
        fs.add_penalty_grad_(weights, "l1l2", 1e-2, backend="native")
        expected = ref.penalty_grad([w.detach() for w in weights], "l1l2")
        for w, d, e in zip(weights, (data_grads[0], data_grads[2]), expected):
            assert w.grad.dtype == torch.float32
            torch.testing.assert_close(w.grad, d + 1e-2 * e, rtol=1e-5, atol=1e-7)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(master, model.parameters()):
                p.copy_(m)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_penalty_under_autocast_stays_fp32(backend):
    """Autocast does not touch the penalty: fp32 statistics, value and gradients."""
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(4, 2, 5, 5)
    weights = [model.conv.weight, model.fc.weight]
    plain = fs.penalty(weights, "group_l1l2", backend=backend)
    expected = torch.autograd.grad(plain, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        value = fs.penalty(weights, "group_l1l2", backend=backend)
    assert out.dtype == torch.bfloat16 and value.dtype == torch.float32
    assert torch.equal(value, plain)
    for g, e in zip(torch.autograd.grad(value, weights), expected):
        assert g.dtype == torch.float32
        assert torch.equal(g, e)
