"""Feature flow regularization: the oracle against the closed form, the fused Triton kernel against
the oracle (values, gradients, dtypes, layouts, gradcheck in float64), the hooks on a ResNet, the
torch.library ops, and large shapes on a GPU (`gpu`)."""

import pytest
import torch
from helpers import assert_close_to_oracle
from torch import nn

from fastsparse import reference as ref
from fastsparse.core import ops  # noqa: F401  (registers torch.ops.fastsparse)
from fastsparse.functional.feature_flow import feature_flow_penalty, feature_flow_value_and_grads
from fastsparse.methods.feature_flow import FeatureFlow, feature_flow_regularizer, flow_sequences
from fastsparse.workflow.models import VGG, ResNetCIFAR


@pytest.fixture
def nan_flow_outputs(monkeypatch):
    """Fresh kernel outputs filled with NaN, so an unwritten gradient element fails a test."""
    from fastsparse.core import layout

    original = layout.new_empty

    def empty_nan(shape, **kwargs):
        return original(shape, **kwargs).fill_(float("nan"))

    monkeypatch.setattr("fastsparse.kernels.feature_flow.new_empty", empty_nan)


def maps(n, shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    # A smooth flow plus noise, like the blocks of a stage.
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(n):
        base = base + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        out.append(base.to(device=device, dtype=dtype))
    return out


def closed_form_grads(features, a, b):
    """dR/dF_l = 2a (D_{l-1} - D_l) + 2b (C_{l-1} - 2 C_l + C_{l+1}), out-of-range terms 0."""
    x = [f.double() for f in features]
    n = len(x)
    d = {k: x[k + 1] - x[k] for k in range(n - 1)}
    c = {k: x[k + 1] - 2 * x[k] + x[k - 1] for k in range(1, n - 1)}
    zero = torch.zeros_like(x[0])
    return [
        2 * a * (d.get(k - 1, zero) - d.get(k, zero))
        + 2 * b * (c.get(k - 1, zero) - 2 * c.get(k, zero) + c.get(k + 1, zero))
        for k in range(n)
    ]


# --------------------------------------------------------------------------------- the oracle


def test_oracle_value_by_hand():
    f = [torch.zeros(2, 3), torch.ones(2, 3), 3 * torch.ones(2, 3)]
    # gradient terms 1 + 4 (per element), curvature 1 (per element)
    assert ref.feature_flow(f, 1.0, 1.0, "mean").item() == pytest.approx(6.0)
    assert ref.feature_flow(f, 0.5, 2.0, "sum").item() == pytest.approx(6 * (0.5 * 5 + 2 * 1))
    assert ref.feature_flow(f[:1]).item() == 0.0
    assert ref.feature_flow(f[:2], 1.0, 5.0, "mean").item() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_oracle_gradient_is_the_closed_form(n):
    features = maps(n, (2, 3, 4), torch.float64)
    got = ref.feature_flow_grad(features, 0.3, 0.7, "sum")
    for g, expected in zip(got, closed_form_grads(features, 0.3, 0.7)):
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- fused against oracle


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(63,), (3, 5, 7), (2, 3, 4, 5)], ids=str)
def test_fused_matches_oracle_fp32(shape, n, device, nan_flow_outputs):
    features = maps(n, shape, device=device)
    leaves = [f.clone().requires_grad_(True) for f in features]
    value = feature_flow_penalty(
        leaves, gradient_weight=0.6, curvature_weight=0.4, backend="triton"
    )
    (1.7 * value).backward()
    v32 = ref.feature_flow(features, 0.6, 0.4)
    v64 = ref.feature_flow([f.double() for f in features], 0.6, 0.4)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert_close_to_oracle(value, v32, v64, name="value")
    g32 = ref.feature_flow_grad(features, 0.6, 0.4)
    g64 = ref.feature_flow_grad([f.double() for f in features], 0.6, 0.4)
    for i, (leaf, e32, e64) in enumerate(zip(leaves, g32, g64)):
        if n == 1:
            assert leaf.grad is None or not leaf.grad.any()
            continue
        assert leaf.grad.dtype == torch.float32
        assert_close_to_oracle(leaf.grad, 1.7 * e32, 1.7 * e64, name=f"grad[{i}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_low_precision_follows_tolerance_rule(dtype, device, nan_flow_outputs):
    features = maps(4, (3, 5, 7), dtype, device, seed=1)
    value, grads = feature_flow_value_and_grads(features, curvature_weight=0.5, backend="triton")
    v_lp = ref.feature_flow(features, 1.0, 0.5)
    v64 = ref.feature_flow([f.double() for f in features], 1.0, 0.5)
    assert value.dtype == torch.float32
    assert_close_to_oracle(value, v_lp, v64, atol=1e-5, name="value")
    g_lp = ref.feature_flow_grad(features, 1.0, 0.5)
    g64 = ref.feature_flow_grad([f.double() for f in features], 1.0, 0.5)
    for i, (g, e_lp, e64) in enumerate(zip(grads, g_lp, g64)):
        assert g.dtype == dtype
        assert_close_to_oracle(g, e_lp, e64, atol=1e-5, name=f"grad[{i}]")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_float64(reduction, device):
    features = [f.requires_grad_(True) for f in maps(4, (2, 3, 2), torch.float64, device)]

    def f(*fs):
        return feature_flow_penalty(
            list(fs),
            gradient_weight=0.3,
            curvature_weight=0.7,
            reduction=reduction,
            backend="triton",
        )

    assert torch.autograd.gradcheck(f, tuple(features), eps=1e-6, atol=1e-8)


def test_value_and_grads_is_value_plus_autograd(device, nan_flow_outputs):
    features = maps(5, (4, 9), torch.float64, device, seed=2)
    value, grads = feature_flow_value_and_grads(
        features, gradient_weight=2.0, curvature_weight=0.25, reduction="sum", backend="triton"
    )
    torch.testing.assert_close(value, ref.feature_flow(features, 2.0, 0.25, "sum"))
    for g, e in zip(grads, closed_form_grads(features, 2.0, 0.25)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_layouts_and_mixed_dtypes(device):
    base = maps(3, (2, 4, 3, 5), device=device, seed=3)
    channels_last = [f.to(memory_format=torch.channels_last) for f in base]
    mixed = [base[0], channels_last[1], base[2][:, :, :, :].contiguous()]
    sliced = [torch.cat([f, f], dim=1)[:, :4] for f in base]  # not dense: copied
    expected = ref.feature_flow(base)
    for features in (channels_last, mixed, sliced):
        leaves = [f.detach().requires_grad_(True) for f in features]  # views stay views
        assert leaves[0].stride() == features[0].stride()
        value = feature_flow_penalty(leaves, backend="triton")
        value.backward()
        torch.testing.assert_close(value, expected)
        for leaf, e in zip(leaves, ref.feature_flow_grad(base)):
            torch.testing.assert_close(leaf.grad, e)
    promoted = feature_flow_penalty([base[0].double(), base[1], base[2]], backend="triton")
    assert promoted.dtype == torch.float64


def test_torch_backend_is_the_oracle():
    features = maps(3, (5, 6))
    torch.testing.assert_close(
        feature_flow_penalty(features, curvature_weight=2.0, backend="torch"),
        ref.feature_flow(features, 1.0, 2.0),
    )


# ------------------------------------------------------------------------------------- hooks


def small_resnet(device):
    torch.manual_seed(0)
    return ResNetCIFAR((3, 2), (4, 8)).to(device), torch.randn(2, 3, 8, 8, device=device)


def stage_outputs(model, x):
    outs = []
    handles = [
        b.register_forward_hook(lambda m, i, o: outs.append(o))
        for stage in model.stages
        for b in stage
    ]
    model(x)
    for h in handles:
        h.remove()
    return outs[:3], outs[3:]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hooks_on_resnet_stages(backend, device):
    model, x = small_resnet(device)
    stage0, stage1 = stage_outputs(model, x)
    expected = 0.1 * (ref.feature_flow(stage0, 1.0, 0.5) + ref.feature_flow(stage1, 1.0, 0.5))
    with FeatureFlow(list(model.stages), 0.1, curvature_weight=0.5, backend=backend) as flow:
        model(x)
        torch.testing.assert_close(flow.value(), expected / 0.1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flow(), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="run a forward"):
            flow()  # the maps were released
    assert not model.stages[0][0]._forward_hooks  # removed


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_backward_equals_autograd_path(backend, device):
    model, x = small_resnet(device)
    flow = FeatureFlow(list(model.stages), 0.05, curvature_weight=2.0, backend=backend)
    (model(x).square().mean() + flow()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    value = flow.backward(model(x).square().mean())
    assert value.dim() == 0 and not value.requires_grad
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-6, msg=n)
    flow.remove()


def test_flow_sequences():
    resnet, x = small_resnet("cpu")
    flows = flow_sequences(resnet, x)
    assert [len(f) for f in flows] == [3, 2]
    assert flows[0] == list(resnet.stages[0])
    vgg = VGG(((4, 4), (8,), (8, 8, 8)))
    flows = flow_sequences(vgg, torch.randn(1, 3, 16, 16))
    assert [len(f) for f in flows] == [2, 3]
    assert all(isinstance(m, nn.ReLU) for f in flows for m in f)
    assert vgg.training  # modes restored


def test_regularizer_entry_point_trains():
    model, x = small_resnet("cpu")
    reg = feature_flow_regularizer(model, x[:1], 1e-2, backend="torch")
    assert [len(f) for f in reg.flows] == [3, 2]
    loss = model(x).square().mean() + reg()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    reg.remove()
    with pytest.raises(ValueError, match="no flow"):
        from fastsparse.workflow.models import LeNet5

        feature_flow_regularizer(LeNet5(), torch.randn(1, 1, 28, 28), 1e-2)


def test_bad_input():
    f = maps(3, (2, 3))
    with pytest.raises(ValueError, match="one shape"):
        feature_flow_penalty([f[0], f[1][:1]])
    with pytest.raises(ValueError, match="gradient_weight"):
        feature_flow_penalty(f, gradient_weight=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        feature_flow_penalty(f, reduction="max")
    with pytest.raises(TypeError, match="sequence of tensors"):
        feature_flow_penalty(f[0])
    with pytest.raises(TypeError, match="floating"):
        feature_flow_penalty([torch.ones(2, dtype=torch.int64)] * 2)
    with pytest.raises(RuntimeError, match="no feature_flow kernel"):
        feature_flow_penalty(f, backend="native")
    with pytest.raises(TypeError, match="not a mix"):
        FeatureFlow([nn.ReLU(), [nn.ReLU()]])


# ----------------------------------------------------------------------------- torch.library


def test_opcheck(device):
    features = maps(4, (3, 5), device=device)
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


def test_compiled_without_graph_breaks(device):
    features = [f.requires_grad_(True) for f in maps(3, (4, 6), device=device)]

    def loss_fn(fs):
        return feature_flow_penalty(fs, curvature_weight=0.5, backend="triton") * 2

    explanation = torch._dynamo.explain(loss_fn)(features)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    compiled(features).backward()
    for f, e in zip(features, ref.feature_flow_grad([f.detach() for f in features], 1.0, 0.5)):
        torch.testing.assert_close(f.grad, 2 * e)


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_large_stage(dtype):
    # The 9 blocks of a ResNet-56 stage at batch 128: 9 maps of 128 x 16 x 32 x 32.
    features = maps(9, (128, 16, 32, 32), dtype, "cuda", seed=4)
    leaves = [f.clone().requires_grad_(True) for f in features]
    value = feature_flow_penalty(leaves, curvature_weight=0.5, backend="triton")
    value.backward()
    v_same = ref.feature_flow(features, 1.0, 0.5)
    v64 = ref.feature_flow([f.double() for f in features], 1.0, 0.5)
    assert_close_to_oracle(value, v_same, v64, atol=1e-5, name="value")
    g_same = ref.feature_flow_grad(features, 1.0, 0.5)
    g64 = ref.feature_flow_grad([f.double() for f in features], 1.0, 0.5)
    for i, (leaf, e, e64) in enumerate(zip(leaves, g_same, g64)):
        assert_close_to_oracle(leaf.grad, e, e64, atol=1e-5, name=f"grad[{i}]")
    value2, grads = feature_flow_value_and_grads(features, curvature_weight=0.5, backend="triton")
    torch.testing.assert_close(value2, value.detach())
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad)


@pytest.mark.gpu
def test_gpu_resnet56_hooks_fused_backward():
    from fastsparse.workflow.models import resnet56

    torch.manual_seed(0)
    model = resnet56().cuda()
    x = torch.randn(32, 3, 32, 32, device="cuda")
    flow = feature_flow_regularizer(model, x[:1], 1e-2, backend="triton")
    assert [len(f) for f in flow.flows] == [9, 9, 9]
    (model(x).square().mean() + flow()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    flow.backward(model(x).square().mean())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-3, atol=1e-5, msg=n)
