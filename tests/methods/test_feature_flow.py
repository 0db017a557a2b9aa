"""Feature flow regularization, the method: the hooks on a ResNet's stages, the fused backward
against the autograd path, the flow sequences of a model, the regularizer entry point, and the
hooks on a ResNet-56 on a GPU (`gpu`)."""

import pytest
import torch
from torch import nn

from fastsparse import reference as ref
from fastsparse.methods.feature_flow import FeatureFlow, feature_flow_regularizer, flow_sequences
from fastsparse.workflow.models import VGG, ResNetCIFAR


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
    with pytest.raises(TypeError, match="not a mix"):
        FeatureFlow([nn.ReLU(), [nn.ReLU()]])


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
