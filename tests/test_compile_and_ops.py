"""torch.library integration: opcheck, torch.compile(fullgraph=True) without graph breaks."""

import pytest
import torch

import fastsparse as fs
from fastsparse import reference as ref
from fastsparse.core import ops  # noqa: F401  (registers torch.ops.fastsparse)


def _weights(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(4, 3, 3, 3, generator=gen, dtype=dtype).to(device).requires_grad_(True),
        torch.randn(4, 6, generator=gen, dtype=dtype).to(device).requires_grad_(True),
    ]


@pytest.mark.parametrize("kind", ["l1l2", "group_hoyer_square"])
def test_opcheck_penalty(kind, device, backend):
    result = torch.library.opcheck(
        torch.ops.fastsparse.penalty.default,
        (_weights(device), kind, "filters,channels", 0.5, backend),
    )
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_backward_inplace_and_norms(device, backend):
    weights = [w.detach() for w in _weights(device)]
    _, coefs = torch.ops.fastsparse.penalty(weights, "l1l2", "filters", 0.5, backend)
    grad_value = torch.tensor(2.0, device=device)
    checks = [
        (
            torch.ops.fastsparse.penalty_backward.default,
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


def _train_step_loss(model, x, backend):
    loss = model(x).square().mean()
    return loss + 1e-2 * fs.penalty([model[0].weight, model[2].weight], "l1l2", backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_compiled_loss_has_no_graph_breaks(backend, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 3)
    ).to(device)
    x = torch.randn(2, 2, 5, 5, device=device)
    explanation = torch._dynamo.explain(_train_step_loss)(model, x, backend)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(_train_step_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(model, x, backend)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _train_step_loss(model, x, "torch").backward()
    for got, expected in zip(compiled_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_inductor_with_fused_penalty(device, backend):
    weights = _weights(device)

    def loss_fn(ws):
        return fs.penalty(ws, "group_l1l2", groups=("filters", "channels"), backend=backend) * 3

    compiled = torch.compile(loss_fn, fullgraph=True)
    value = compiled(weights)
    value.backward()
    expected = [
        3 * g
        for g in ref.penalty_grad(
            [w.detach() for w in weights], "group_l1l2", ("filters", "channels")
        )
    ]
    torch.testing.assert_close(
        value.detach(),
        3 * ref.penalty([w.detach() for w in weights], "group_l1l2", ("filters", "channels")),
    )
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.grad, e, rtol=1e-5, atol=1e-6)


def test_compiled_inplace_step(device, backend):
    weights = [w.detach().requires_grad_(True) for w in _weights(device)]
    for w in weights:
        w.grad = torch.zeros_like(w)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ws):
        return fs.add_penalty_grad_(ws, "group_lasso", 0.5, backend=backend)

    step(weights)
    for w, e in zip(weights, ref.penalty_grad([w.detach() for w in weights], "group_lasso")):
        torch.testing.assert_close(w.grad, 0.5 * e)
