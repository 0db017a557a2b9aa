"""Models: forward shapes, parameter counts, get_model, and traceability by Torch-Pruning."""

import pytest
import torch
import torch_pruning as tp
from torch import nn

from fastsparse.workflow.models import (
    MODEL_NAMES,
    LeNet5,
    MobileNetCIFAR,
    get_model,
    mobilenet_cifar,
    resnet18_cifar,
    resnet56,
    vgg11_bn,
    vgg16_bn,
)

# The CIFAR models' native input; LeNet5's is MNIST's.
INPUT_SHAPES = {name: (3, 32, 32) for name in MODEL_NAMES}
INPUT_SHAPES["lenet5"] = (1, 28, 28)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape(name):
    model = get_model(name)
    out = model(torch.rand(2, *INPUT_SHAPES[name]))
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_num_classes(name):
    assert get_model(name, num_classes=7)(torch.rand(2, *INPUT_SHAPES[name])).shape == (2, 7)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "lenet5"])
def test_cifar_models_take_mnist(name):
    # The bundled data set is MNIST: every CIFAR model must run on 1×28×28 too.
    model = get_model(name, in_channels=1)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_lenet5_on_cifar():
    model = get_model("lenet5", in_channels=3, image_size=32)
    assert model.classifier[0].in_features == 50 * 5 * 5
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size"):
        LeNet5(image_size=8)


def test_lenet5_architecture_and_parameter_count():
    model = LeNet5()
    conv1, conv2 = (m for m in model.modules() if isinstance(m, nn.Conv2d))
    fc1, fc2 = (m for m in model.modules() if isinstance(m, nn.Linear))
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (1, 20, (5, 5))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size) == (20, 50, (5, 5))
    assert (fc1.in_features, fc1.out_features) == (800, 500)
    assert (fc2.in_features, fc2.out_features) == (500, 10)
    # 20·25+20 + 50·20·25+50 + 800·500+500 + 500·10+10
    assert n_params(model) == 520 + 25_050 + 400_500 + 5_010 == 431_080


@pytest.mark.parametrize(
    "build, expected",
    [
        # The usual CIFAR counts (kuangliu/pytorch-cifar: 9,231,114 and 14,728,266) minus the
        # conv biases, which are redundant before BatchNorm and left out here.
        (vgg11_bn, 9_231_114 - (64 + 128 + 2 * 256 + 4 * 512)),
        (vgg16_bn, 14_728_266 - (2 * 64 + 2 * 128 + 3 * 256 + 6 * 512)),
        (resnet18_cifar, 11_173_962),
        # He et al.'s ResNet-56 with option-A shortcuts has 853,018 parameters; the two
        # option-B projections add a 1×1 conv and a BatchNorm each: 16·32 + 64 and 32·64 + 128.
        (resnet56, 853_018 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)),
    ],
    ids=["vgg11_bn", "vgg16_bn", "resnet18", "resnet56"],
)
def test_parameter_counts(build, expected):
    assert n_params(build()) == expected


def test_resnet56_structure():
    model = resnet56()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem + 27 blocks × 2 = 55 weighted convs (+ the fc: 56 layers), + 2 projection shortcuts.
    assert len(convs) == 57
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2
    assert {m.out_channels for m in convs} == {16, 32, 64}


def test_mobilenet_is_depthwise_separable():
    model = mobilenet_cifar()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(depthwise) == 7
    for m in depthwise:
        assert m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3)
    assert 400_000 < n_params(model) < 700_000
    # The width multiplier scales every layer: parameters shrink roughly quadratically.
    narrow = MobileNetCIFAR(width=0.5)
    assert n_params(narrow) < n_params(model) / 3
    assert narrow(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="width"):
        MobileNetCIFAR(width=0)


def test_get_model_forwards_kwargs():
    model = get_model("mobilenet", width=0.25)
    assert max(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)) == 128


def test_get_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'resnet50'") as info:
        get_model("resnet50")
    for name in MODEL_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_relus_are_distinct_and_not_inplace(name):
    # Activation hooks (feature-flow regularization) must see each activation once, unmodified.
    model = get_model(name)
    calls = {}
    for relu in (m for m in model.modules() if isinstance(m, nn.ReLU)):
        assert not relu.inplace
        relu.register_forward_hook(lambda m, i, o: calls.__setitem__(m, calls.get(m, 0) + 1))
    model(torch.rand(2, *INPUT_SHAPES[name]))
    assert calls and set(calls.values()) == {1}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backward_reaches_every_parameter(name):
    model = get_model(name, **({"width": 0.25} if name == "mobilenet" else {}))
    model(torch.rand(2, *INPUT_SHAPES[name])).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_torch_pruning_removes_filters(name):
    # Torch-Pruning must trace every model: remove 2 filters from every coupled conv group and
    # check that each conv lost exactly 2 output channels and the model still runs.
    model = get_model(name).eval()
    example = torch.rand(1, *INPUT_SHAPES[name])
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    roots = [g[0].dep.target.module for g in dg.get_all_groups(root_module_types=[nn.Conv2d])]
    for root in roots:
        dg.get_pruning_group(root, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert after == {n: c - 2 for n, c in before.items()}
    assert model(torch.rand(2, *INPUT_SHAPES[name])).shape == (2, 10)
