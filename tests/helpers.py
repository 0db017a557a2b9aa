"""Shared test utilities: shapes, groupings that apply to a shape, tolerance rule."""

from __future__ import annotations

import os

import torch

from fastsparse import reference as ref

# Odd shapes of the issue: 1x1, 7x13, 3x5x3x3, 20x1x5x5, 50x20x5x5, plus a bias vector.
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
    assert worst <= 0, (
        f"{name}: kernel error {kernel_error.max().item():.3e} exceeds 2x torch's own "
        f"same-dtype error {torch_error.max().item():.3e} + {atol * scale:.3e}"
    )


def contract_coefficients(w: torch.Tensor, kind: str, grouping, alpha: float = 0.5):
    """Per-group (a, b) of the contract table in DESIGN.md, in fp64: dR/dw = a*sign(w) + b*w.

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
    for grouping in ref.as_groupings(groups):
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
