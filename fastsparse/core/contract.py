"""The numerical contract's names and rules, defined once for every layer and backend.

Per group g of a tensor: s1 = sum |w|, s2 = sum w^2, n = sqrt(s2); per tensor L = sum_g n_g,
F^2 = sum_g s2_g. Every penalty kind is a function of these statistics, and its gradient is
a_g sign(w) + b_g w with per-group coefficients (a_g, b_g) (docs/design.md). Statistics
accumulate in the accumulation dtype below.

Nothing here imports more than torch, so the Triton kernels, the native backend, the oracle and
the public API can all read these names.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

# --- penalty kinds and groupings ---------------------------------------------------------------

KINDS = (
    "l1",
    "l2",
    "group_lasso",
    "l1l2",
    "group_l1l2",
    "hoyer_square",
    "group_hoyer_square",
    "sparse_group_lasso",
)
# Kinds whose value couples the groups of a tensor (through L and F): they need every group's
# statistics before any gradient can be written.
ACROSS_GROUP_KINDS = ("group_l1l2", "group_hoyer_square")

GROUPINGS = ("filters", "channels", "kernels", None)
Grouping = Union[str, None, Sequence[Union[str, None]]]

# The tensor dims that index a grouping's groups ("kernels": one group per (out, in) pair).
GROUP_DIMS = {"filters": (0,), "channels": (1,), "kernels": (0, 1), None: ()}
# A grouping needs this many dims (filters work on any tensor, a 0-dim one is one group).
MIN_DIMS = {"filters": 0, "channels": 2, "kernels": 3, None: 0}
# Coupled-group members are slices along dim 0 (rows, as "filters") or dim 1 (as "channels").
GROUPING_OF_DIM = {0: "filters", 1: "channels"}

# --- proximal steps ----------------------------------------------------------------------------

PROX_KINDS = ("l1", "group_lasso", "l0", "group_l0", "l0_group_lasso")
ELEMENT_PROX_KINDS = ("l1", "l0")  # act element by element; the grouping only shapes the masks
GROUP_PROX_KINDS = ("group_lasso", "group_l0", "l0_group_lasso")

# The optimizer steps fused with the prox (torch.optim.SGD; Adam and AdamW): the options their
# kernels read, one NamedTuple per family. Built where an optimizer's hyperparameters are read,
# passed as they are down to the kernels; the fused op's schema takes their values as floats, in
# the order of the fields (fastsparse/ops.py), and the native library reads them as the structs
# fs_sgd_step and fs_adam_step of backends/csrc/fastsparse_native.h, field for field.


class SGDStepOptions(NamedTuple):
    """torch.optim.SGD's step: d = grad + weight_decay * w; with momentum, buf = d at the first
    step (`first`: the buffers' contents are not read; always true without momentum), else
    momentum * buf + (1 - dampening) * d, and d = buf (Nesterov: d + momentum * buf);
    w -= lr * d.

    >>> SGDStepOptions(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
    ...                first=True).momentum
    0.9
    """

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    first: bool

    family = "sgd"  # the name of the fused step across the op and the native library


class AdamStepOptions(NamedTuple):
    """torch.optim.Adam's and AdamW's step (`decoupled`: AdamW's weight decay) at one step t,
    its bias corrections folded in: step_size = lr / (1 - beta1^t), bias2_sqrt =
    sqrt(1 - beta2^t). `at_step` computes them.

    >>> AdamStepOptions.at_step(1, lr=0.1, betas=(0.5, 0.75), eps=1e-8, weight_decay=0.0,
    ...                         decoupled=True).step_size
    0.2
    """

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    step_size: float
    bias2_sqrt: float

    family = "adam"

    @classmethod
    def at_step(
        cls, step: int, *, lr: float, betas, eps: float, weight_decay: float, decoupled: bool
    ) -> AdamStepOptions:
        """The options of step `step` (1 at the first) with these hyperparameters."""
        lr, (beta1, beta2) = float(lr), (float(b) for b in betas)
        return cls(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=float(eps),
            weight_decay=float(weight_decay),
            decoupled=bool(decoupled),
            step_size=lr / (1 - beta1**step),
            bias2_sqrt=(1 - beta2**step) ** 0.5,
        )


StepOptions = Union[SGDStepOptions, AdamStepOptions]

# --- the other methods' options ------------------------------------------------------------------

FLOW_REDUCTIONS = ("mean", "sum")
RELEVANCE_KINDS = ("taylor", "magnitude", "gradient")

# --- compile-time ids in every backend's kernels (backends/csrc/fastsparse_native.h mirrors them)

KIND_IDS = {
    "l1": 0,
    "l2": 1,
    "group_lasso": 2,
    "l1l2": 3,
    "hoyer_square": 4,
    "sparse_group_lasso": 5,
    "group_l1l2": 6,
    "group_hoyer_square": 7,
}
# "scale" multiplies each group by given factors (coupled groups: factors from their norms).
PROX_IDS = {"l1": 0, "l0": 1, "group_lasso": 2, "group_l0": 3, "l0_group_lasso": 4, "scale": 5}


# --- dtypes --------------------------------------------------------------------------------------


# Group statistics, coefficients (a_g, b_g) and prox factors between kernels, whatever the
# weights' dtype: a group of fp32 weights with norm 1e-30 has s2 = 1e-60 and coefficients up to
# 1/n^3 = 1e90, which only fp64 holds. The kernels take them in [groups, 2] fp64 buffers.
COEFFICIENT_DTYPE = torch.float64


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics accumulate in: fp64 for fp64 input, fp32 for every other dtype.

    >>> accumulation_dtype(torch.bfloat16)
    torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulation_dtype_of(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype of a value over several tensors: fp64 if any of them is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def grad_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of t's gradient: t.grad_dtype when set (fp32 gradients of bf16 parameters on
    torch >= 2.10), else t's dtype."""
    return getattr(t, "grad_dtype", None) or t.dtype


def as_groupings(groups: Grouping) -> tuple[Optional[str], ...]:
    """A grouping argument as a tuple of groupings.

    >>> as_groupings("filters"), as_groupings(("filters", None))
    (('filters',), ('filters', None))
    """
    if isinstance(groups, (tuple, list)):
        return tuple(groups)
    return (groups,)
