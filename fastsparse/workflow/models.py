"""Models from the filter-pruning literature, as plain ``nn.Module``s without pretrained weights.

- :class:`LeNet5`: the Caffe LeNet-5 variant used on MNIST by the pruning papers (20 and 50
  filters, 500 hidden units; 431,080 parameters).
- :func:`vgg11_bn`, :func:`vgg16_bn`: VGG with BatchNorm for CIFAR-10 (one Linear classifier).
- :func:`resnet56`: the CIFAR ResNet of He et al. (3 stages of 9 basic blocks, 16/32/64
  channels) with 1×1-conv ("option B") shortcuts where the shape changes.
- :func:`resnet18_cifar`: ResNet-18 for 32×32 inputs (3×3 stem, no max-pool).
- :func:`mobilenet_cifar`: a small MobileNet-v1-style depthwise-separable network.

Every model is built only from modules that Torch-Pruning's ``DependencyGraph`` traces
(``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``, ``nn.ReLU``, pooling, ``torch.flatten`` and
residual ``+``), so filters can be removed physically after sparse training. Each ReLU is its own
module and none is in-place, so forward hooks see every activation exactly once and unmodified
(feature-flow regularization hooks activations).

Example::

    >>> from fastsparse.workflow.models import get_model
    >>> model = get_model("resnet56")
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "LeNet5",
    "MobileNetCIFAR",
    "ResNetCIFAR",
    "VGG",
    "get_model",
    "mobilenet_cifar",
    "resnet18_cifar",
    "resnet56",
    "vgg11_bn",
    "vgg16_bn",
]

MODEL_NAMES = ("lenet5", "vgg11_bn", "vgg16_bn", "resnet18", "resnet56", "mobilenet")


def _init_weights(model: nn.Module) -> None:
    """He initialization for convolutions, unit scale and zero shift for BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> List[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    ]


# --------------------------------------------------------------------------- LeNet-5


class LeNet5(nn.Module):
    """LeNet-5 (Caffe variant): conv 20 5×5 → pool → conv 50 5×5 → pool → fc 500 → fc classes.

    Args:
        num_classes: number of outputs.
        in_channels: input channels (1 for MNIST).
        image_size: side of the square input; 28 gives the 800-feature flatten (50·4·4).

    Shapes: input (N, in_channels, image_size, image_size) → logits (N, num_classes).
    With the defaults the model has 431,080 parameters.

    Example::

        >>> LeNet5()(torch.randn(8, 1, 28, 28)).shape
        torch.Size([8, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5×5 convs, each followed by pool 2
        if side < 1:
            raise ValueError(f"LeNet5 needs image_size >= 12, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(50 * side * side, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# --------------------------------------------------------------------------- VGG


# Channels of the 3×3 convolutions, stage by stage; every stage ends with a 2×2 max-pool.
_VGG_CFGS = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}


class VGG(nn.Module):
    """VGG with BatchNorm for small images: 3×3 conv-BN-ReLU stages, max-pools, one Linear.

    Args:
        cfg: one tuple per stage with the channel counts of its 3×3 convolutions; every stage
            ends with a 2×2 max-pool.
        num_classes: number of outputs.
        in_channels: input channels (3 for CIFAR-10).

    Shapes: input (N, in_channels, H, W) → logits (N, num_classes); built for 32×32 CIFAR, and
    any other size works too (28×28 MNIST included).

    Example::

        >>> VGG(_VGG_CFGS["vgg11"])(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: List[nn.Module] = []
        channels = in_channels
        for stage in cfg:
            for width in stage:
                layers += _conv_bn_relu(channels, width)
                channels = width
            # ceil_mode: identical to the usual pool on 32×32 inputs (every side stays even) and
            # lets 28×28 inputs reach 1×1 instead of failing at the last pool.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        # Adaptive pooling is a no-op on the 1×1 map of 32×32 inputs and keeps larger inputs valid.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def vgg11_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-11 with BatchNorm for CIFAR: 8 convs (64..512), Linear 512 → classes; 9.23 M params.

    Shapes: (N, in_channels, 32, 32) → (N, num_classes).

    Example::

        >>> vgg11_bn()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VGG(_VGG_CFGS["vgg11"], num_classes, in_channels)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-16 with BatchNorm for CIFAR: 13 convs (64..512), Linear 512 → classes; 14.72 M params.

    Shapes: (N, in_channels, 32, 32) → (N, num_classes).

    Example::

        >>> vgg16_bn()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return VGG(_VGG_CFGS["vgg16"], num_classes, in_channels)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut; a 1×1 conv-BN shortcut when the shape changes.

    Shapes: (N, in_channels, H, W) → (N, channels, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_channels != channels:
            # Option B of He et al.: a learned projection, which Torch-Pruning can prune along
            # with the residual stream (option A's zero-padding is not traceable).
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """ResNet for 32×32 images: 3×3 stem, stages of :class:`BasicBlock`, global pool, Linear.

    Args:
        blocks: number of blocks per stage, e.g. (9, 9, 9) for ResNet-56.
        widths: channels per stage, e.g. (16, 32, 64); the stem has ``widths[0]`` channels and
            every stage after the first halves the resolution.
        num_classes: number of outputs.
        in_channels: input channels.

    Shapes: (N, in_channels, H, W) → (N, num_classes).

    Example::

        >>> ResNetCIFAR((1, 1, 1), (16, 32, 64))(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks {blocks} and widths {widths} must have the same length")
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, widths[0]))
        stages = []
        channels = widths[0]
        for i, (n_blocks, width) in enumerate(zip(blocks, widths)):
            stage = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-56 for CIFAR: 3 stages of 9 basic blocks, 16/32/64 channels; 0.86 M params.

    Shapes: (N, in_channels, 32, 32) → (N, num_classes).

    Example::

        >>> resnet56()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNetCIFAR((9, 9, 9), (16, 32, 64), num_classes, in_channels)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCIFAR:
    """ResNet-18 for CIFAR: 3×3 stem, blocks [2, 2, 2, 2], 64..512 channels; 11.17 M params.

    Shapes: (N, in_channels, 32, 32) → (N, num_classes).

    Example::

        >>> resnet18_cifar()(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return ResNetCIFAR((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels)


# --------------------------------------------------------------------------- MobileNet


# (output channels, stride) of each depthwise-separable block; MobileNet-v1's first 7 blocks.
_MOBILENET_CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1))


class MobileNetCIFAR(nn.Module):
    """Small MobileNet-v1-style network: a 3×3 stem, then depthwise-separable blocks.

    Each block is a depthwise 3×3 conv (``groups`` = channels) + BN + ReLU followed by a
    pointwise 1×1 conv + BN + ReLU.

    Args:
        num_classes: number of outputs.
        in_channels: input channels.
        width: width multiplier applied to every layer's channel count (MobileNet's alpha).

    Shapes: (N, in_channels, H, W) → (N, num_classes).

    Example::

        >>> MobileNetCIFAR(width=0.5)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")

        def scaled(c: int) -> int:
            return max(1, int(round(c * width)))

        channels = scaled(32)
        layers: List[nn.Module] = list(_conv_bn_relu(in_channels, channels))
        for out, stride in _MOBILENET_CFG:
            out = scaled(out)
            layers += _conv_bn_relu(channels, channels, stride=stride, groups=channels)
            layers += [nn.Conv2d(channels, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_cifar(
    num_classes: int = 10, in_channels: int = 3, width: float = 1.0
) -> MobileNetCIFAR:
    """Depthwise-separable network for CIFAR (7 blocks up to 512·width channels).

    Shapes: (N, in_channels, 32, 32) → (N, num_classes).

    Example::

        >>> mobilenet_cifar(width=0.25)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return MobileNetCIFAR(num_classes, in_channels, width)


# --------------------------------------------------------------------------- by name


_BUILDERS = {
    "lenet5": LeNet5,
    "vgg11_bn": vgg11_bn,
    "vgg16_bn": vgg16_bn,
    "resnet18": resnet18_cifar,
    "resnet56": resnet56,
    "mobilenet": mobilenet_cifar,
}


def get_model(
    name: str, num_classes: int = 10, in_channels: Optional[int] = None, **kwargs
) -> nn.Module:
    """Build a freshly initialized model by name.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: number of outputs.
        in_channels: input channels; ``None`` keeps the model's default (1 for ``"lenet5"``,
            3 for the CIFAR models). Pass ``dataset.in_channels`` to match a data set.
        **kwargs: forwarded to the builder, e.g. ``width=0.5`` for ``"mobilenet"`` or
            ``image_size=32`` for ``"lenet5"``.

    Returns:
        The model in training mode, on the CPU, in float32.

    Example::

        >>> get_model("lenet5")(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
        >>> get_model("resnet56", in_channels=1)(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if in_channels is not None:
        kwargs["in_channels"] = in_channels
    return _BUILDERS[name](num_classes=num_classes, **kwargs)
