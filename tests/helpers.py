"""Shared test utilities: shapes, groupings that apply to a shape, the tolerance rule, and the
inputs (tensors, feature maps, coupled groups, small models) that several test modules build."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from fastsparse import reference as ref
from fastsparse.core.contract import as_groupings
from fastsparse.core.groups import CoupledGroup, CoupledMember
from fastsparse.workflow.config import RunConfig
from fastsparse.workflow.models import VGG, LeNet5, MobileNetCIFAR, ResNetCIFAR

# Odd shapes every kernel test runs on: a single element (1x1), rows of an odd length (7x13),
# kernels of a conv (3x5x3x3), a single input channel (20x1x5x5), strided channel groups and a
# tensor longer than one block (50x20x5x5), plus a bias vector. tests/core/test_layout.py checks
# that each one takes the layout path it is here for.
ODD_SHAPES = [(1, 1), (7, 13), (3, 5, 3, 3), (20, 1, 5, 5), (50, 20, 5, 5), (7,)]
GROUPINGS = ["filters", "channels", "kernels", None, ("filters", "channels")]


def applies(grouping, shape) -> bool:
    groupings = grouping if isinstance(grouping, tuple) else (grouping,)
    need = {"channels": 2, "kernels": 3}
    return all(len(shape) >= need.get(g, 0) for g in groupings)


def shapes_for(grouping, shapes=ODD_SHAPES):
    return [s for s in shapes if applies(grouping, s)]


def grouping_id(grouping) -> str:
    if isinstance(grouping, tuple):
        return "+".join(str(g) for g in grouping)
    return str(grouping)


# Rounding error of the final cast to the output dtype, in ulps. Triton's CPU interpreter casts
# fp32 -> bf16 by truncation (its cast_impl passes no rounding mode); compiled Triton rounds to
# nearest even. So under the interpreter a bf16 output may be one ulp off, on a GPU half an ulp.
ROUNDING_ULPS = {torch.bfloat16: 1.0} if os.environ.get("TRITON_INTERPRET") == "1" else {}


def gradient_scale(grads) -> float:
    """The largest gradient entry over a whole list of tensors (at least 1).

    Gradient errors are measured norm-wise, relative to this: element-wise relative error is
    meaningless where the two terms a*sign(w) and b*w cancel (a one-element group's l1l2
    gradient is exactly 0, and ulp(1/|w|) in any fp32 evaluation order).
    """
    return max([1.0] + [g.double().abs().max().item() for g in grads if g.numel()])


def assert_close_to_oracle(
    actual, oracle_same_dtype, oracle_fp64, *, atol=1e-6, scale=None, name=""
):
    """The flash-attention rule: |kernel - fp64| <= 2 |torch same-dtype - fp64| + atol * scale,
    plus half an ulp of the output dtype at the exact value (rounding the exact result to the
    output dtype is unavoidable, and torch's own rounding may land closer by luck).

    `atol * scale` covers fp32 summation-order differences; `scale` defaults to the largest
    magnitude of the fp64 values (see gradient_scale for lists of gradients).
    """
    actual64 = actual.double()
    oracle64 = oracle_fp64.double()
    if scale is None:
        scale = max(1.0, oracle64.abs().max().item()) if oracle64.numel() else 1.0
    kernel_error = (actual64 - oracle64).abs()
    torch_error = (oracle_same_dtype.double() - oracle64).abs()
    rounding = ROUNDING_ULPS.get(actual.dtype, 0.5) * torch.finfo(actual.dtype).eps * oracle64.abs()
    bound = 2 * torch_error + rounding + atol * scale
    worst = (kernel_error - bound).max().item() if kernel_error.numel() else -1
    assert not torch.isnan(actual64).any(), f"{name}: NaN in kernel output"
    largest_atol = float(atol * torch.as_tensor(scale).max())  # scale may be per element
    assert worst <= 0, (
        f"{name}: kernel error {kernel_error.max().item():.3e} exceeds 2x torch's own "
        f"same-dtype error {torch_error.max().item():.3e} + {largest_atol:.3e}"
    )


def contract_coefficients(w: torch.Tensor, kind: str, grouping, alpha: float = 0.5):
    """Per-group (a, b) of the contract's gradient table, in fp64: dR/dw = a*sign(w) + b*w.

    Written from the table, independently of the kernels' rule, so a test can check the table
    against autograd of the oracle and measure kernel errors against the terms' magnitude.
    """
    s1, s2 = ref.group_stats(w.double(), grouping)
    nz = s2 > 0
    n = torch.sqrt(s2)
    inv = lambda x: torch.where(x > 0, 1.0 / torch.where(x > 0, x, 1.0), 0.0)  # noqa: E731
    L, F2 = n.sum(), s2.sum()
    F = torch.sqrt(F2)
    zeros, ones = torch.zeros_like(s1), torch.ones_like(s1)
    table = {
        "l1": (ones, zeros),
        "l2": (zeros, ones),
        "group_lasso": (zeros, inv(n)),
        "l1l2": (inv(n), -s1 * inv(n) ** 3),
        "group_l1l2": (zeros, inv(n) * inv(F) - L * inv(F) ** 3),
        "hoyer_square": (2 * s1 * inv(s2), -2 * s1**2 * inv(s2) ** 2),
        "group_hoyer_square": (zeros, 2 * L * inv(F2) * inv(n) - 2 * L**2 * inv(F2) ** 2),
        "sparse_group_lasso": (alpha * ones, (1 - alpha) * inv(n)),
    }
    a, b = table[kind]
    return torch.where(nz, a, 0.0), torch.where(nz, b, 0.0)


def term_magnitude(w: torch.Tensor, kind: str, groups, alpha: float = 0.5) -> torch.Tensor:
    """Per element |a_g| + |b_g * w| summed over groupings, shaped like w (fp64).

    A kernel's rounding error in a gradient element is proportional to these terms, not to
    the result, which may cancel to 0 (a one-element group's l1l2 gradient).
    """
    w64 = w.double()
    total = torch.zeros_like(w64)
    for grouping in as_groupings(groups):
        a, b = contract_coefficients(w64, kind, grouping, alpha)
        view = ref.grouped_view(w64, grouping)
        mag = a.abs()[:, None] + (b[:, None] * view).abs()
        total += ungroup(mag, w64, grouping)
    return total


def ungroup(grouped: torch.Tensor, like: torch.Tensor, grouping) -> torch.Tensor:
    """Inverse of reference.grouped_view for a [groups, size] matrix."""
    shape = tuple(like.shape)
    if grouping == "channels":
        moved = (shape[1], shape[0], *shape[2:])
        return grouped.reshape(moved).transpose(0, 1)
    return grouped.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Tensors for the penalty and prox tests
# ------------------------------------------------------------------------------------------------


def make(shapes, dtype, device, seed=0, zero_groups=True):
    """Random tensors with some all-zero filters, so the zero-group rule is exercised."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if zero_groups and t.dim() >= 2 and t.shape[0] > 2:
            t[1] = 0
        tensors.append(t.to(device=device, dtype=dtype))
    return tensors


def two_weights(device, dtype=torch.float32):
    """A conv weight and a linear weight that require grad (the torch.library and compile tests)."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(4, 3, 3, 3, generator=gen, dtype=dtype).to(device).requires_grad_(True),
        torch.randn(4, 6, generator=gen, dtype=dtype).to(device).requires_grad_(True),
    ]


def params_with_grad():
    """A conv weight with a .grad and a bias without one: the inputs of the bad-call tests."""
    a = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    a.grad = torch.ones_like(a)
    return [a, b]


def snapshot(tensors):
    return [(t.detach().clone(), None if t.grad is None else t.grad.clone()) for t in tensors]


def assert_unchanged(tensors, before):
    for t, (value, grad) in zip(tensors, before):
        assert torch.equal(t.detach(), value)
        assert (t.grad is None) == (grad is None)
        if grad is not None:
            assert torch.equal(t.grad.to_dense(), grad.to_dense())


def fill_new_empty_with_nan(monkeypatch, *modules):
    """Make every uninitialized kernel output of `modules` NaN, so an unwritten element fails."""
    from fastsparse.core import layout

    original = layout.new_empty

    def empty_nan(shape, **kwargs):
        return original(shape, **kwargs).fill_(float("nan"))

    for module in modules:
        monkeypatch.setattr(f"{module}.new_empty", empty_nan)


# ------------------------------------------------------------------------------------------------
# Coupled groups
# ------------------------------------------------------------------------------------------------


class TinyConvNet(nn.Module):
    """LeNet's structure (conv, BN, conv, flatten into a linear layer) at interpreter size."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def coupled_models():
    """[(model, input)]: a TinyConvNet with trained-looking BN, and a small ResNet."""
    torch.manual_seed(0)
    tiny = TinyConvNet()
    with torch.no_grad():  # BN scales and shifts of a trained net, not all ones and zeros
        tiny.bn1.weight.uniform_(0.5, 1.5)
        tiny.bn1.bias.uniform_(-0.5, 0.5)
    resnet = ResNetCIFAR((1, 1, 1, 1), (4, 8, 8, 16), num_classes=5, in_channels=3)
    return [(tiny, torch.randn(2, 1, 6, 6)), (resnet, torch.randn(2, 3, 16, 16))]


def overlapping_groups():
    """Two layers a -> b and the two OICSR-style coupled groups, overlapping on b's weight.

    Group set A (root "a", G=3): a.weight rows, a.bias, b.weight columns.
    Group set B (root "b", G=2): b.weight rows.
    """
    torch.manual_seed(6)
    a_w = torch.randn(3, 4, dtype=torch.float64)
    a_b = torch.randn(3, dtype=torch.float64)
    b_w = torch.randn(2, 3, dtype=torch.float64)
    ar = torch.arange(3)
    group_a = CoupledGroup(
        "a",
        3,
        (
            CoupledMember("a.weight", a_w, 0, ar, ar),
            CoupledMember("a.bias", a_b, 0, ar, ar),
            CoupledMember("b.weight", b_w, 1, ar, ar),
        ),
    )
    group_b = CoupledGroup("b", 2, (CoupledMember("b.weight", b_w, 0, ar[:2], ar[:2]),))
    return [group_a, group_b], (a_w, a_b, b_w)


def explicit_rows(groups):
    """Each group's elements, gathered with Python loops."""
    out = []
    for cg in groups:
        rows = []
        for g in range(cg.num_groups):
            parts = [
                m.param.select(m.dim, int(i)).flatten()
                for m in cg.members
                for i, gid in zip(m.index, m.group)
                if int(gid) == g
            ]
            rows.append(torch.cat(parts))
        out.append(rows)
    return out


# ------------------------------------------------------------------------------------------------
# Feature flow and selective decay inputs
# ------------------------------------------------------------------------------------------------


def feature_maps(n, shape, dtype=torch.float32, device="cpu", seed=0):
    """n feature maps of one shape: a smooth flow plus noise, like the blocks of a stage."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(n):
        base = base + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        out.append(base.to(device=device, dtype=dtype))
    return out


def flow_closed_form_grads(features, a, b):
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


DECAY_SHAPES = [(5, 3, 3, 3), (7,), (1, 1), (4100,), (13, 9)]


def decay_params(shapes=DECAY_SHAPES, dtype=torch.float32, grad_dtype=None, device="cpu", seed=0):
    """Leaf tensors with random values and random .grad (of grad_dtype, default their dtype)."""
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


# ------------------------------------------------------------------------------------------------
# Models for the pruning tests
# ------------------------------------------------------------------------------------------------


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv: a model the pruning code was not written for."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU())
        self.c = nn.Conv2d(11, 7, 3)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(y.mean(dim=(2, 3)))


ARCHS = {
    "lenet5": (lambda: LeNet5(), (2, 1, 28, 28)),
    "vgg11_bn": (lambda: VGG(((8,), (16,), (16, 16), (32, 32), (32, 32))), (2, 3, 32, 32)),
    "resnet18": (lambda: ResNetCIFAR((2, 2, 2, 2), (8, 16, 32, 64)), (2, 3, 32, 32)),
    "mobilenet": (lambda: MobileNetCIFAR(width=0.125), (2, 3, 32, 32)),
    "concat": (ConcatNet, (2, 3, 12, 12)),
}


def arch_model(arch: str, seed: int = 0):
    """A model of ARCHS with non-trivial BatchNorm statistics (BN is not the identity) and an
    input."""
    builder, shape = ARCHS[arch]
    torch.manual_seed(seed)
    model = builder()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model, torch.randn(shape)


def eval_out(model, x):
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model, before, training=True):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    assert all(m.training == training for m in model.modules())


def pick_dead(groups, fraction=0.5, seed=1):
    """Per coupled group, a random set of channel ids to kill."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randperm(cg.num_groups, generator=gen)[: int(cg.num_groups * fraction)]
        for cg in groups
    ]


def shrink(groups, dead, factor=1e-4):
    """Scale the dead channels' coupled slices down (as sparse training would)."""
    with torch.no_grad():
        for cg, d in zip(groups, dead):
            for m in cg.members:
                sel = m.index[torch.isin(m.group, d)]
                m.param.index_copy_(m.dim, sel, m.param.index_select(m.dim, sel) * factor)


def explicit_prox(w: torch.Tensor, kind: str, t, grouping) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element and group by group in fp64 with Python loops: the independent check of
    the prox kinds."""
    t_elem, t_group = (t, t) if not isinstance(t, tuple) else t
    x = ref.grouped_view(w.double(), grouping).clone()
    kept = []
    for g in range(x.shape[0]):
        row = x[g]
        if kind in ("l0", "l0_group_lasso"):
            row = torch.tensor([v if abs(v) > t_elem else 0.0 for v in row.tolist()], dtype=x.dtype)
        if kind == "l1":
            row = torch.tensor(
                [math.copysign(max(abs(v) - t_elem, 0.0), v) for v in row.tolist()], dtype=x.dtype
            )
        n = math.sqrt(sum(v * v for v in row.tolist()))
        if kind in ("group_lasso", "l0_group_lasso"):
            row = row * (max(0.0, 1.0 - t_group / n) if n > t_group else 0.0)
        if kind == "group_l0":
            row = row * (1.0 if n > t_group else 0.0)
        x[g] = row
        kept.append(n > t_group if kind not in ("l1", "l0") else bool((row != 0).any()))
    return ref.ungroup(x, w.shape, grouping), torch.tensor(kept, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# The training workflow
# ------------------------------------------------------------------------------------------------

# One epoch on a few hundred images with the oracle backend: seconds, on any machine.
TINY_RUN = RunConfig(
    kind="group_l1l2",
    strength=0.3,
    epochs=1,
    train_samples=256,
    test_samples=128,
    batch_size=64,
    backend="torch",
    device="cpu",
)


def tiny_llama(**overrides):
    """A 2-layer Llama decoder with random weights (seed 0), built from a config: never a
    download. Needs transformers (the caller skips without it)."""
    import transformers

    options = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    options.update(overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**options)).eval()


def record_constexpr(monkeypatch, module: str, kernel: str, name: str) -> list:
    """The values of constexpr `name` at every launch of `module.kernel` from now on (the
    kernels still run)."""
    import importlib

    target = importlib.import_module(module)
    real = getattr(target, kernel)
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs[name])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(target, kernel, Recorder())
    return seen
