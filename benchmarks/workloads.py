"""Workloads: the single tensors and whole-model parameter lists the harness measures.

Single tensors, each in fp32 and bf16 (the gradient has the weight's dtype):

    lenet5.conv2      50×20×5×5        LeNet-5's second convolution
    vgg16.conv        512×512×3×3      a VGG-16 convolution of the last stages
    resnet50.conv1x1  2048×512×1×1     a ResNet-50 bottleneck expansion (layer4 conv3)
    llm.mlp_up        11008×4096       Llama-7B gate/up projection
    llm.mlp_down      4096×11008       Llama-7B down projection
    llm70b.mlp        28672×8192       Llama-70B gate/up projection

Whole models (every parameter, biases and BatchNorm included, as `model.parameters()` gives):

    lenet5            fastsparse.workflow.models.LeNet5 (431,080 parameters, fp32)
    vgg16             fastsparse.workflow.models.vgg16_bn, VGG-16-BN for CIFAR-10 (14.7 M, fp32)
    resnet50          torchvision's ResNet-50 architecture, written out below (25.6 M, fp32)
    llama7b           a stack of Llama-7B decoder layers: 2 RMSNorm weights (4096), q/k/v/o
                      (4096×4096), gate/up (11008×4096), down (4096×11008); 202.4 M per layer;
                      bf16 weights with fp32 gradients; no embeddings. The number of layers is
                      chosen to fit the device (see `llama_layers`).

Profiles choose the workloads: "full" (everything above; the default on CUDA), "cpu" (the sizes
that a 2-core CPU measures in a few minutes; the default on CPU) and "quick" (tiny, for the CI
smoke run: seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

Shape = Tuple[int, ...]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Llama-7B decoder layer: (name, shape), in Hugging Face parameter order.
LLAMA7B_HIDDEN, LLAMA7B_INTERMEDIATE, LLAMA7B_LAYERS = 4096, 11008, 32


def llama_layer_shapes(hidden: int, intermediate: int) -> List[Tuple[str, Shape]]:
    """The parameters of one Llama decoder layer, in Hugging Face order."""
    return [
        ("input_layernorm.weight", (hidden,)),
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden, hidden)),
        ("self_attn.v_proj.weight", (hidden, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("post_attention_layernorm.weight", (hidden,)),
        ("mlp.gate_proj.weight", (intermediate, hidden)),
        ("mlp.up_proj.weight", (intermediate, hidden)),
        ("mlp.down_proj.weight", (hidden, intermediate)),
    ]


def group_count(shape: Shape, grouping) -> int:
    """Number of groups of a tensor of `shape` under one grouping of the contract."""
    if grouping == "filters":
        return shape[0] if shape else 1
    if grouping == "channels":
        return shape[1]
    if grouping == "kernels":
        return shape[0] * shape[1]
    if grouping is None:
        return 1
    raise ValueError(f"unknown grouping {grouping!r}")


# --------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (v1.5: the stride sits on the 3×3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision.models.resnet50's architecture (same parameter names, shapes and order).

    25,557,032 parameters in 161 tensors; input (N, 3, H, W) → logits (N, 1000).
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            layer = []
            for j in range(blocks):
                layer.append(Bottleneck(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _lenet5() -> nn.Module:
    from fastsparse.workflow.models import LeNet5

    return LeNet5()


def _vgg16() -> nn.Module:
    from fastsparse.workflow.models import vgg16_bn

    return vgg16_bn()


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One measured parameter list.

    Attributes:
        name: short identifier ("vgg16.conv", "resnet50").
        family: "tensor" (one tensor) or "model" (a whole model's parameter list).
        dtype: the weights' dtype.
        grad_dtype: the dtype of .grad in the in-place mode (and of autograd's gradient).
        shapes: the tensors' shapes, in order.
        model_fn: builds the nn.Module (model workloads that Torch-Pruning can trace).
        example_input: input shape for tracing the model.
        note: one line for the report.
    """

    name: str
    family: str
    dtype: torch.dtype
    grad_dtype: torch.dtype
    shapes: List[Shape]
    model_fn: Optional[Callable[[], nn.Module]] = None
    example_input: Optional[Shape] = None
    note: str = ""
    names: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Unique name with dtypes, e.g. "vgg16.conv fp32" or "llama7b x2 bf16/fp32"."""
        w, g = DTYPE_NAMES[self.dtype], DTYPE_NAMES[self.grad_dtype]
        return f"{self.name} {w}" if w == g else f"{self.name} {w}/{g}"

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def weight_bytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    @property
    def grad_bytes(self) -> int:
        return self.numel * _itemsize(self.grad_dtype)

    def groups(self, grouping) -> int:
        """Total number of groups under a grouping (or the sum over a tuple of groupings)."""
        groupings = grouping if isinstance(grouping, (tuple, list)) else (grouping,)
        return sum(group_count(s, g) for s in self.shapes for g in groupings)

    def describe(self, grouping="filters") -> dict:
        """JSON-ready summary (groups: the number of groups under `grouping`)."""
        try:
            groups = self.groups(grouping)
        except (IndexError, ValueError):
            groups = None
        return {
            "label": self.label,
            "name": self.name,
            "family": self.family,
            "dtype": DTYPE_NAMES[self.dtype],
            "grad_dtype": DTYPE_NAMES[self.grad_dtype],
            "tensors": len(self.shapes),
            "numel": self.numel,
            "weight_bytes": self.weight_bytes,
            "grad_bytes": self.grad_bytes,
            "groups": groups,
            "shapes": [list(s) for s in self.shapes] if len(self.shapes) <= 4 else None,
            "note": self.note,
        }

    def build(self, device: torch.device, seed: int = 0):
        """(params, model): leaf tensors with requires_grad=True on `device`, and the model.

        Deterministic for a seed. Weights (2+ dims) are random normal with std 0.05; 1-D
        parameters keep their init (BatchNorm and norms: scale 1, shift 0, so some groups are
        exactly zero, as in a real model; biases: PyTorch's default uniform init).
        """
        gen = torch.Generator(device=device).manual_seed(seed)
        model = None
        if self.model_fn is not None:
            with torch.random.fork_rng(devices=[]):  # deterministic init, global RNG untouched
                torch.manual_seed(seed)
                model = self.model_fn()
            model = model.to(device=device, dtype=self.dtype)
            params = list(model.parameters())
            with torch.no_grad():
                for p in params:
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.05)
        else:
            params = []
            for shape in self.shapes:
                if len(shape) > 1:
                    values = torch.randn(shape, generator=gen, device=device).mul_(0.05)
                else:  # norm weights: ones, as initialized
                    values = torch.ones(shape, device=device)
                params.append(values.to(self.dtype))
        for p in params:
            p.requires_grad_(True)
            if self.grad_dtype != self.dtype and hasattr(p, "grad_dtype"):
                p.grad_dtype = self.grad_dtype  # torch >= 2.10 checks .grad's dtype otherwise
        return params, model


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


SINGLE_TENSORS = {
    "lenet5.conv2": (50, 20, 5, 5),
    "vgg16.conv": (512, 512, 3, 3),
    "resnet50.conv1x1": (2048, 512, 1, 1),
    "llm.mlp_up": (11008, 4096),
    "llm.mlp_down": (4096, 11008),
    "llm70b.mlp": (28672, 8192),
}


def tensor_workload(name: str, dtype: torch.dtype, shape: Optional[Shape] = None) -> Workload:
    """A single-tensor workload (gradient in the weight's dtype)."""
    shape = shape or SINGLE_TENSORS[name]
    return Workload(name, "tensor", dtype, dtype, [tuple(shape)])


def model_workload(name: str) -> Workload:
    """lenet5, vgg16 or resnet50 (fp32), from the real architecture."""
    builders = {
        "lenet5": (_lenet5, (1, 1, 28, 28), "fastsparse.workflow.models.LeNet5 (MNIST)"),
        "vgg16": (_vgg16, (1, 3, 32, 32), "fastsparse.workflow.models.vgg16_bn (CIFAR-10)"),
        "resnet50": (ResNet50, (1, 3, 64, 64), "torchvision resnet50 architecture (ImageNet)"),
    }
    fn, example, note = builders[name]
    model = fn()
    named = list(model.named_parameters())
    return Workload(
        name,
        "model",
        torch.float32,
        torch.float32,
        [tuple(p.shape) for _, p in named],
        model_fn=fn,
        example_input=example,
        note=note,
        names=[n for n, _ in named],
    )


def llama_workload(
    layers: int,
    hidden: int = LLAMA7B_HIDDEN,
    intermediate: int = LLAMA7B_INTERMEDIATE,
    dtype: torch.dtype = torch.bfloat16,
) -> Workload:
    """A stack of `layers` Llama decoder layers: bf16 weights and fp32 gradients, or fp32
    weights and gradients (dtype=torch.float32: what an optimizer steps, the master weights)."""
    per_layer = llama_layer_shapes(hidden, intermediate)
    tiny = hidden != LLAMA7B_HIDDEN
    name = f"llama-tiny{hidden} x{layers}" if tiny else f"llama7b x{layers}"
    note = f"{layers} decoder layer(s), hidden {hidden}, intermediate {intermediate}, no embeddings"
    return Workload(
        name,
        "model",
        dtype,
        torch.float32,
        [s for _ in range(layers) for _, s in per_layer],
        note=note,
        names=[f"layers.{i}.{n}" for i in range(layers) for n, _ in per_layer],
    )


# Bytes per element the worst provider may need on top of the weights and gradients
# (the eager oracle keeps an fp32 copy of every weight for backward, then the bf16 gradients).
_LLAMA_EXTRA_BYTES_PER_ELEMENT = 12


def llama_layers(device: torch.device, requested: Optional[int] = None) -> int:
    """How many Llama-7B layers to stack: `requested`, or as many as fit the device.

    On CUDA: the layers whose weights (2 B), fp32 gradients (4 B) and the eager oracle's
    temporaries (about 12 B per element) fit in 70% of the free memory, capped at 32 (Llama-7B).
    On CPU: 1 (measuring more takes minutes per provider on a few cores).
    """
    if requested:
        return requested
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    per_layer = sum(math.prod(s) for _, s in llama_layer_shapes(LLAMA7B_HIDDEN, 11008))
    per_layer_bytes = per_layer * (2 + 4 + _LLAMA_EXTRA_BYTES_PER_ELEMENT)
    return max(1, min(LLAMA7B_LAYERS, int(0.7 * free // per_layer_bytes)))


PROFILES = ("full", "cpu", "quick")


def profile_workloads(
    profile: str,
    device: torch.device,
    llama: Optional[int] = None,
    llama_dtype: torch.dtype = torch.bfloat16,
) -> List[Workload]:
    """The workloads of a profile ("full", "cpu" or "quick"); the Llama stack in `llama_dtype`."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if profile == "quick":
        return [
            tensor_workload("lenet5.conv2", fp32),
            tensor_workload("mlp.small", bf16, (256, 512)),
            model_workload("lenet5"),
            llama_workload(llama or 1, hidden=64, intermediate=172, dtype=llama_dtype),
        ]
    if profile == "cpu":
        names = ["lenet5.conv2", "vgg16.conv", "resnet50.conv1x1", "llm.mlp_down"]
        tensors = [tensor_workload(n, dt) for n in names for dt in (fp32, bf16)]
        models = [model_workload(n) for n in ("lenet5", "vgg16", "resnet50")]
        if llama:
            models.append(llama_workload(llama, dtype=llama_dtype))
        return tensors + models
    if profile == "full":
        tensors = [tensor_workload(n, dt) for n in SINGLE_TENSORS for dt in (fp32, bf16)]
        models = [model_workload(n) for n in ("lenet5", "vgg16", "resnet50")]
        return tensors + models + [llama_workload(llama_layers(device, llama), dtype=llama_dtype)]
    raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")


def select(workloads: Sequence[Workload], patterns: Optional[Sequence[str]]) -> List[Workload]:
    """The workloads whose label contains any of `patterns` (all when patterns is empty)."""
    if not patterns:
        return list(workloads)
    return [w for w in workloads if any(p in w.label for p in patterns)]
