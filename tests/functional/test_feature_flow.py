"""Feature flow regularization, the functional layer: the fused Triton kernel against the oracle
(values, gradients, dtypes, layouts, gradcheck in float64), the torch backend, bad input,
torch.compile, and large shapes on a GPU (`gpu`)."""

import pytest
import torch

from fastsparse import reference as ref
from fastsparse.functional.feature_flow import feature_flow_penalty, feature_flow_value_and_grads
from tests.helpers import (
    assert_close_to_oracle,
    feature_maps,
    fill_new_empty_with_nan,
    flow_closed_form_grads,
    record_constexpr,
)


@pytest.fixture
def nan_flow_outputs(monkeypatch):
    """Fresh kernel outputs filled with NaN, so an unwritten gradient element fails a test."""
    fill_new_empty_with_nan(monkeypatch, "fastsparse.backends.triton.feature_flow")


# ------------------------------------------------------------------------------------------------
# The fused kernel against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(63,), (3, 5, 7), (2, 3, 4, 5)], ids=str)
def test_fused_matches_oracle_fp32(shape, n, device, nan_flow_outputs):
    features = feature_maps(n, shape, device=device)
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


@pytest.mark.parametrize("shape, vector", [((8, 16, 4), True), ((63,), False)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_vector_and_scalar_paths(shape, vector, dtype, device, monkeypatch, nan_flow_outputs):
    # 16-byte accesses only when every map is aligned and the size a multiple of a vector.
    launched = record_constexpr(
        monkeypatch, "fastsparse.backends.triton.feature_flow", "_feature_flow_kernel", "VEC"
    )
    features = feature_maps(3, shape, dtype, device, seed=3)
    value, grads = feature_flow_value_and_grads(features, curvature_weight=0.5, backend="triton")
    assert launched and all((v > 0) == vector for v in launched), launched
    _assert_matches_oracle(features, value, grads)


def _assert_matches_oracle(features, value, grads):
    """Value and gradients (curvature weight 0.5) against the oracle, by the tolerance rule."""
    v_same = ref.feature_flow(features, 1.0, 0.5)
    v64 = ref.feature_flow([f.double() for f in features], 1.0, 0.5)
    assert_close_to_oracle(value, v_same, v64, atol=1e-5, name="value")
    g_same = ref.feature_flow_grad(features, 1.0, 0.5)
    g64 = ref.feature_flow_grad([f.double() for f in features], 1.0, 0.5)
    for i, (g, e, e64) in enumerate(zip(grads, g_same, g64)):
        assert g.dtype == features[i].dtype
        assert_close_to_oracle(g, e, e64, atol=1e-5, name=f"grad[{i}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_low_precision_follows_tolerance_rule(dtype, device, nan_flow_outputs):
    features = feature_maps(4, (3, 5, 7), dtype, device, seed=1)
    value, grads = feature_flow_value_and_grads(features, curvature_weight=0.5, backend="triton")
    assert value.dtype == torch.float32
    _assert_matches_oracle(features, value, grads)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_float64(reduction, device):
    features = [f.requires_grad_(True) for f in feature_maps(4, (2, 3, 2), torch.float64, device)]

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
    features = feature_maps(5, (4, 9), torch.float64, device, seed=2)
    value, grads = feature_flow_value_and_grads(
        features, gradient_weight=2.0, curvature_weight=0.25, reduction="sum", backend="triton"
    )
    torch.testing.assert_close(value, ref.feature_flow(features, 2.0, 0.25, "sum"))
    for g, e in zip(grads, flow_closed_form_grads(features, 2.0, 0.25)):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_layouts_and_mixed_dtypes(device):
    base = feature_maps(3, (2, 4, 3, 5), device=device, seed=3)
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
    features = feature_maps(3, (5, 6))
    torch.testing.assert_close(
        feature_flow_penalty(features, curvature_weight=2.0, backend="torch"),
        ref.feature_flow(features, 1.0, 2.0),
    )


def test_bad_input():
    f = feature_maps(3, (2, 3))
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
    with pytest.raises(TypeError, match=r"features\[1\] is a str, not a tensor"):
        feature_flow_penalty([f[0], "F1"])
    with pytest.raises(
        ValueError, match=r"all features must be on one device.*meta \(features\[1\]"
    ):
        feature_flow_penalty([f[0], f[1].to("meta")])
    with pytest.raises(RuntimeError, match="no feature_flow kernel"):
        feature_flow_penalty(f, backend="native")


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def test_compiled_without_graph_breaks(device):
    features = [f.requires_grad_(True) for f in feature_maps(3, (4, 6), device=device)]

    def loss_fn(fs):
        return feature_flow_penalty(fs, curvature_weight=0.5, backend="triton") * 2

    explanation = torch._dynamo.explain(loss_fn)(features)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    compiled(features).backward()
    for f, e in zip(features, ref.feature_flow_grad([f.detach() for f in features], 1.0, 0.5)):
        torch.testing.assert_close(f.grad, 2 * e)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_large_stage(dtype):
    # The 9 blocks of a ResNet-56 stage at batch 128: 9 maps of 128 x 16 x 32 x 32.
    features = feature_maps(9, (128, 16, 32, 32), dtype, "cuda", seed=4)
    leaves = [f.clone().requires_grad_(True) for f in features]
    value = feature_flow_penalty(leaves, curvature_weight=0.5, backend="triton")
    value.backward()
    _assert_matches_oracle(features, value, [leaf.grad for leaf in leaves])
    value2, grads = feature_flow_value_and_grads(features, curvature_weight=0.5, backend="triton")
    torch.testing.assert_close(value2, value.detach())
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad)
