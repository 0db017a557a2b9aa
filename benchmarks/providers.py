"""Providers: the implementations the harness puts side by side on every workload and mode.

Each provider implements up to three operations of the numerical contract (docs/design.md):

    penalty(case, tensors)  the value R, differentiable when the tensors require grad
    add_grad_(case)         p.grad += strength * dR/dp for every parameter, returns R (or None)
    group_norms(case, ws)   per tensor, the 1-D tensor of group l2 norms

and, for the optimizer-step mode (prox_step), `sparse_step(case)`: a function that runs one
optimizer step (SGD with momentum, or AdamW: `case.step`) over every parameter, followed by a
group-lasso proximal step of threshold lr * strength on the regularized weights (the tensors of
2+ dims).

Providers (role "fastsparse" is measured against every "baseline"; "reference" rows are shown
but are not baselines):

    fastsparse-triton     fastsparse's fused Triton kernels (backend="triton"; CUDA)
    fastsparse-native     fastsparse's C++ kernels (backend="native"; skipped where absent)
    fastsparse-native-unfused  prox_step only: the optimizer's step, then one fused prox (the
                          path of optimizers whose step fastsparse does not fuse)
    eager-oracle          fastsparse.reference, called as is (never copied)
    compile-default       torch.compile(fastsparse.reference.penalty / group_norms)
    compile-max-autotune  the same with mode="max-autotune-no-cudagraphs"
    handwritten           the best eager version a user would write: closed-form gradient, no
                          autograd graph, fp32 statistics without copies, torch._foreach_norm
                          for whole-tensor statistics
    torch-pruning         Torch-Pruning's GroupNormPruner.regularize (in-place mode, whole
                          models only; its own penalty: DepGraph's group-norm regularizer)
    copy                  torch._foreach_copy_(grads, weights): the traffic floor of the
                          in-place mode (reference; its bytes are W + G, what it moves)
    plain-step            the optimizer's step alone (prox_step's reference: what every
                          sparse step costs on top of)
    torchao-pat           torchao's PruneOptimizer (pruning-aware training, Meta) around the
                          same optimizer: ProxGroupLasso on Dim0Grouper groups (prox_step)

A provider that cannot run says why (`unavailable`, `unsupported`); the harness records that as
"skipped", and an exception while running as "failed", never as a crash.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from benchmarks.workloads import Workload
from fastsparse import reference
from fastsparse.core.contract import ACROSS_GROUP_KINDS, as_groupings

FASTSPARSE, BASELINE, REFERENCE = "fastsparse", "baseline", "reference"
PENALTY_MODES = ("value", "value_grad", "inplace", "group_norms")
# The optimizers of the prox_step mode (multi-tensor, foreach) and their learning rates.
STEP_LRS = {"sgd": 0.1, "adamw": 1e-3}


@dataclass
class Case:
    """One workload on one device with the penalty settings of the run.

    Attributes:
        workload: the workload.
        params: its leaf tensors (requires_grad=True), on `device`.
        model: the nn.Module that owns `params` (model workloads), else None.
        kind, groups, alpha, strength: the penalty (fastsparse.penalty's arguments).
        device: where the tensors live.
        allow_interpreter: let the Triton provider run on CPU under TRITON_INTERPRET=1.
        step: the prox_step mode's optimizer, "sgd" or "adamw".
    """

    workload: Workload
    params: List[torch.Tensor]
    model: Optional[torch.nn.Module]
    kind: str
    groups: Any
    alpha: float
    strength: float
    device: torch.device
    allow_interpreter: bool = False
    step: str = "sgd"
    cache: dict = field(default_factory=dict)

    @property
    def weights(self) -> List[torch.Tensor]:
        """The parameters detached (no autograd graph)."""
        return [p.detach() for p in self.params]

    @property
    def options(self) -> dict:
        """Keyword options of fastsparse.penalty for this kind."""
        return {"alpha": self.alpha} if self.kind == "sparse_group_lasso" else {}


class Provider:
    """Base class: a named implementation; subclasses override the operations they have."""

    name = "provider"
    role = BASELINE
    description = ""
    checked = True  # compared with the oracle (False: computes something else on purpose)
    modes: tuple = PENALTY_MODES

    def unavailable(self, case: Case) -> Optional[str]:
        """Why this provider cannot run on this case at all, or None."""
        return None

    def unsupported(self, mode: str, case: Case) -> Optional[str]:
        """Why this provider does not implement `mode`, or None."""
        if mode not in self.modes:
            return f"{self.name} has no {mode} operation"
        return None

    def moved_bytes(self, mode: str, workload: Workload) -> Optional[int]:
        """Bytes this provider must move when they differ from the mode's model (else None)."""
        return None

    def start(self, case: Case) -> None:
        """Called once per workload before its modes run (untimed): build caches, reset."""

    def finish(self) -> None:
        """Called after a workload: drop references to its tensors."""

    def penalty(self, case: Case, tensors: List[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def add_grad_(self, case: Case) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def group_norms(self, case: Case, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        raise NotImplementedError

    def sparse_step(self, case: Case):
        raise NotImplementedError


def regularized(case: Case) -> List[torch.Tensor]:
    """The tensors the prox_step mode regularizes: the weights of 2+ dims (conv, linear)."""
    return [p for p in case.params if p.dim() >= 2]


def step_optimizer(case: Case, params) -> torch.optim.Optimizer:
    """The prox_step mode's optimizer: SGD with momentum 0.9, or AdamW (``case.step``)."""
    lr = STEP_LRS[case.step]
    if case.step == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=True)
    return torch.optim.AdamW(params, lr=lr, foreach=True)


# --------------------------------------------------------------------------- fastsparse


class Fastsparse(Provider):
    """fastsparse's public API with an explicit backend."""

    role = FASTSPARSE
    modes = PENALTY_MODES + ("prox_step",)

    def __init__(self, backend: str, fuse_step: bool = True):
        self.backend = backend
        self.fuse_step = fuse_step
        self.name = f"fastsparse-{backend}" + ("" if fuse_step else "-unfused")
        self.description = (
            f'fastsparse.penalty / add_penalty_grad_ / group_norms(backend="{backend}")'
        )
        if not fuse_step:  # the path of optimizers without a fused step: step, then one prox
            self.modes = ("prox_step",)
            self.description = (
                f'SparseOptimizer(fuse_step=False, backend="{backend}"): the optimizer\'s step, '
                "then one fused prox"
            )

    def unavailable(self, case: Case) -> Optional[str]:
        from fastsparse import backends

        if self.backend not in backends.BACKENDS:
            return f'this fastsparse has no backend="{self.backend}" yet'
        try:
            if self.backend == "triton":
                return _triton_reason(case)
            return backends.native_unavailable_reason(case.device)
        except Exception as error:  # a broken build is a reason to skip, not to crash
            return f"{type(error).__name__}: {error}"

    def penalty(self, case, tensors):
        import fastsparse

        return fastsparse.penalty(
            tensors, case.kind, groups=case.groups, backend=self.backend, **case.options
        )

    def add_grad_(self, case):
        import fastsparse

        return fastsparse.add_penalty_grad_(
            case.params,
            case.kind,
            case.strength,
            groups=case.groups,
            backend=self.backend,
            **case.options,
        )

    def group_norms(self, case, tensors):
        import fastsparse

        return fastsparse.group_norms(tensors, groups=case.groups, backend=self.backend)

    def sparse_step(self, case):
        from fastsparse.optim import Rule, SparseOptimizer

        rule = Rule(
            lambda name, p: p.dim() >= 2,
            prox="group_lasso",
            strength=case.strength,
            groups=case.groups,
        )
        opt = SparseOptimizer(
            step_optimizer(case, case.params),
            list(case.params),
            [rule],
            backend=self.backend,
            fuse_step=self.fuse_step,
        )
        return opt.step


def _triton_reason(case: Case) -> Optional[str]:
    from fastsparse import backends

    if case.device.type == "cpu":
        if not case.allow_interpreter:
            return (
                "Triton kernels run on CUDA; on CPU only under TRITON_INTERPRET=1, which is "
                "for tests, not timing (--allow-interpreter runs it anyway)"
            )
        if not backends.triton_interpreter_enabled():
            return "--allow-interpreter needs TRITON_INTERPRET=1 set before fastsparse starts"
    return backends.triton_unavailable_reason(case.device)


# --------------------------------------------------------------------------- the oracle


def _accumulate_(params: List[torch.Tensor], updates, strength: float) -> None:
    """p.grad += strength * update for every parameter (one multi-tensor op)."""
    torch._foreach_add_([p.grad for p in params], list(updates), alpha=strength)


class EagerOracle(Provider):
    """fastsparse.reference as is: value by its penalty, gradient by autograd through it."""

    name = "eager-oracle"
    description = (
        "fastsparse.reference.penalty / group_norms in eager PyTorch; prox_step: SGD, then "
        "fastsparse.reference.prox_ tensor by tensor (the loop a user writes)"
    )
    modes = PENALTY_MODES + ("prox_step",)

    def _penalty_fn(self):
        return reference.penalty

    def _norms_fn(self):
        return reference.group_norms

    def penalty(self, case, tensors):
        return self._penalty_fn()(tensors, case.kind, case.groups, case.alpha)

    def add_grad_(self, case):
        # One forward and one backward through the oracle, then one multi-tensor add.
        leaves = [p.detach().requires_grad_(True) for p in case.params]
        with torch.enable_grad():
            value = self._penalty_fn()(leaves, case.kind, case.groups, case.alpha)
            updates = torch.autograd.grad(value, leaves)
        _accumulate_(case.params, updates, case.strength)
        return value.detach()

    def group_norms(self, case, tensors):
        return self._norms_fn()(tensors, case.groups)

    def sparse_step(self, case):
        opt = step_optimizer(case, case.params)
        weights = [p.detach() for p in regularized(case)]
        threshold = STEP_LRS[case.step] * case.strength

        def step():
            opt.step()
            for w in weights:
                reference.prox_([w], "group_lasso", threshold, case.groups)

        return step


class CompiledOracle(EagerOracle):
    """torch.compile of the oracle's penalty and group norms (compiled once per workload)."""

    modes = PENALTY_MODES

    def __init__(self, mode: str):
        self.mode = mode
        self.name = "compile-default" if mode == "default" else "compile-max-autotune"
        self.description = f'torch.compile(fastsparse.reference.penalty, mode="{mode}")'
        self._compiled = {}

    def start(self, case):
        # A fresh start per workload: no recompilation limit, no automatic dynamic shapes.
        torch._dynamo.reset()
        self._compiled = {
            "penalty": torch.compile(reference.penalty, mode=self.mode),
            "norms": torch.compile(reference.group_norms, mode=self.mode),
        }

    def finish(self):
        self._compiled = {}
        torch._dynamo.reset()

    def _penalty_fn(self):
        return self._compiled["penalty"]

    def _norms_fn(self):
        return self._compiled["norms"]


# --------------------------------------------------------------------------- hand-written


def _reduce_dims(w: torch.Tensor, grouping) -> Optional[List[int]]:
    """The dims a grouping reduces over; None when every element is its own group."""
    d = w.dim()
    need = {"channels": 2, "kernels": 3}.get(grouping, 0)
    if d < need:
        raise ValueError(f"grouping {grouping!r} needs {need} dims, got shape {tuple(w.shape)}")
    if grouping == "filters":
        return list(range(1, d)) if d >= 2 else None
    if grouping == "channels":
        return [0, *range(2, d)]
    if grouping == "kernels":
        return list(range(2, d))
    if grouping is None:
        return list(range(d)) if d >= 1 else None
    raise ValueError(f"unknown grouping {grouping!r}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats(w: torch.Tensor, grouping):
    """(s1, n) per group in fp32 (fp64 for fp64), shaped to broadcast against w; no copy of w."""
    dims = _reduce_dims(w, grouping)
    acc = _acc(w.dtype)
    if dims is None:
        s1 = w.abs().to(acc)
        return s1, s1
    s1 = torch.linalg.vector_norm(w, 1, dim=dims, keepdim=True, dtype=acc)
    n = torch.linalg.vector_norm(w, 2, dim=dims, keepdim=True, dtype=acc)
    return s1, n


def _whole_tensor_norms(ws: List[torch.Tensor]) -> List[torch.Tensor]:
    """||W||_2 of every tensor, fp32, in one multi-tensor launch (torch._foreach_norm)."""
    if not ws:
        return []
    return list(torch._foreach_norm(ws, 2, dtype=_acc(ws[0].dtype)))


def _div(num, den):
    """num / den where den > 0, else 0, with finite gradients (the double-where idiom)."""
    positive = den > 0
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)), 0.0)


def _value(kind: str, s1, n, alpha: float, F=None):
    """Per-tensor penalty from group statistics (F = ||W|| for the across-group kinds)."""
    if kind == "l1":
        return s1.sum()
    if kind == "l2":
        return 0.5 * (n * n).sum()
    if kind == "group_lasso":
        return n.sum()
    if kind == "l1l2":
        return _div(s1, n).sum()
    if kind == "hoyer_square":
        return _div(s1 * s1, n * n).sum()
    if kind == "sparse_group_lasso":
        return alpha * s1.sum() + (1.0 - alpha) * n.sum()
    if kind == "group_l1l2":
        return _div(n.sum(), F)
    if kind == "group_hoyer_square":
        return _div(n.sum() ** 2, F * F)
    raise ValueError(f"unknown kind {kind!r}")


def _coefficients(kind: str, s1, n, alpha: float, F=None):
    """(a, b) with dR/dw = a·sign(w) + b·w; either may be a Python number or None (zero)."""
    inv_n = torch.where(n > 0, 1.0 / n, 0.0)
    if kind == "l1":
        return 1.0, None
    if kind == "l2":
        return None, 1.0
    if kind == "group_lasso":
        return None, inv_n
    if kind == "l1l2":
        return inv_n, -s1 * inv_n**3
    if kind == "hoyer_square":
        inv_s2 = inv_n * inv_n
        return 2.0 * s1 * inv_s2, -2.0 * (s1 * inv_s2) ** 2
    if kind == "sparse_group_lasso":
        return alpha, (1.0 - alpha) * inv_n
    inv_f = torch.where(F > 0, 1.0 / F, 0.0)
    total = n.sum()
    if kind == "group_l1l2":
        return None, inv_n * inv_f - total * inv_f**3
    if kind == "group_hoyer_square":
        return None, 2.0 * total * inv_f**2 * inv_n - 2.0 * total**2 * inv_f**4
    raise ValueError(f"unknown kind {kind!r}")


def _add_scaled_(g: torch.Tensor, x: torch.Tensor, coef, strength: float) -> None:
    if coef is None:
        return
    if isinstance(coef, float):
        g.add_(x, alpha=strength * coef)
    else:
        g.addcmul_(x, coef, value=strength)


class Handwritten(Provider):
    """What a careful user writes in eager PyTorch, without fastsparse.

    Per tensor: s1 and n with torch.linalg.vector_norm(dim=..., keepdim=True, dtype=fp32) (no fp32
    copy of the weights, no reshape copy for "channels"); whole-tensor norms for every tensor in
    one torch._foreach_norm; the in-place gradient in closed form, a·sign(w) + b·w, with two
    addcmul_ into .grad and no autograd graph; the value through autograd of the same statistics.
    """

    name = "handwritten"
    description = "vectorized eager PyTorch: vector_norm stats, _foreach_norm, closed-form grad"

    def _groupings(self, case):
        return as_groupings(case.groups)

    def _frobenius(self, case, ws):
        if case.kind in ACROSS_GROUP_KINDS:
            return _whole_tensor_norms(ws)
        return [None] * len(ws)

    def penalty(self, case, tensors):
        total = []
        for grouping in self._groupings(case):
            frob = self._frobenius(case, tensors)
            for w, F in zip(tensors, frob):
                s1, n = _stats(w, grouping)
                total.append(_value(case.kind, s1, n, case.alpha, F))
        return torch.stack(total).sum()

    def add_grad_(self, case):
        with torch.no_grad():
            ws = case.weights
            total = []
            for grouping in self._groupings(case):
                frob = self._frobenius(case, ws)
                for p, w, F in zip(case.params, ws, frob):
                    s1, n = _stats(w, grouping)
                    total.append(_value(case.kind, s1, n, case.alpha, F))
                    a, b = _coefficients(case.kind, s1, n, case.alpha, F)
                    _add_scaled_(p.grad, w.sign() if a is not None else w, a, case.strength)
                    _add_scaled_(p.grad, w, b, case.strength)
            return torch.stack(total).sum()

    def group_norms(self, case, tensors):
        grouping = case.groups
        if grouping is None:
            return [n.reshape(1) for n in _whole_tensor_norms(tensors)]
        out = []
        for w in tensors:
            dims = _reduce_dims(w, grouping)
            if dims is None:
                out.append(w.abs().to(_acc(w.dtype)).reshape(-1))
            else:
                out.append(torch.linalg.vector_norm(w, 2, dim=dims, dtype=_acc(w.dtype)).flatten())
        return out


# --------------------------------------------------------------------------- Torch-Pruning


class TorchPruning(Provider):
    """Torch-Pruning's GroupNormPruner.regularize: adds its group-norm penalty gradient to .grad.

    Its penalty is DepGraph's (coupled groups, gradient reg·γ_g·w with γ from the group norms),
    not the contract's kind: it is measured as what users run instead, and not checked.
    """

    name = "torch-pruning"
    description = "torch_pruning GroupNormPruner.regularize (DepGraph group-norm regularizer)"
    checked = False
    modes = ("inplace",)

    def __init__(self):
        self._pruner = None

    def unavailable(self, case):
        if importlib.util.find_spec("torch_pruning") is None:
            return "torch_pruning is not installed"
        if case.model is None:
            return "applies to whole nn.Module models that its DependencyGraph traces"
        return None

    def unsupported(self, mode, case):
        if mode != "inplace":
            return "GroupNormPruner.regularize only adds to .grad (in-place mode)"
        return None

    def start(self, case):
        self._pruner = None
        if self.unavailable(case) is not None:
            return
        import torch_pruning as tp

        example = torch.randn(case.workload.example_input, device=case.device)
        self._pruner = tp.pruner.GroupNormPruner(
            case.model,
            example_inputs=example.to(case.workload.dtype),
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            reg=case.strength,
        )

    def finish(self):
        self._pruner = None

    def add_grad_(self, case):
        self._pruner.regularize(case.model)
        return None


# --------------------------------------------------------------------------- references


class Copy(Provider):
    """torch._foreach_copy_(grads, weights): reads W and writes G once, the in-place floor."""

    name = "copy"
    role = REFERENCE
    description = "torch._foreach_copy_ of the weights into the gradients"
    checked = False
    modes = ("inplace",)

    def unsupported(self, mode, case):
        if mode != "inplace":
            return "the copy reference is measured in the in-place mode only"
        return None

    def moved_bytes(self, mode, workload):
        return workload.weight_bytes + workload.grad_bytes  # reads W, writes G

    def add_grad_(self, case):
        torch._foreach_copy_([p.grad for p in case.params], case.weights)
        return None


class PlainStep(Provider):
    """The plain optimizer step: the cost every sparse step adds to."""

    name = "plain-step"
    role = REFERENCE
    description = "the optimizer's own step alone (foreach), no sparsity"
    checked = False
    modes = ("prox_step",)

    def sparse_step(self, case):
        return step_optimizer(case, case.params).step


class TorchaoPAT(Provider):
    """torchao's pruning-aware training optimizer around the same SGD.

    PruneOptimizer keeps a latent copy of every regularized weight and applies one vmapped prox
    per tensor in a Python loop. Its group-lasso threshold is lr * lambda * sqrt(group size)
    (its tau) and its step is AProx (the prox of the latent weights with the summed learning
    rates), so the weights differ from the contract's prox: measured, not checked.
    """

    name = "torchao-pat"
    description = (
        "torchao.prototype.pat.optim.PruneOptimizer(SGD): ProxGroupLasso on Dim0Grouper groups"
    )
    checked = False
    modes = ("prox_step",)

    def unavailable(self, case):
        if importlib.util.find_spec("torchao") is None:
            return "torchao is not installed (pip install torchao)"
        return None

    def unsupported(self, mode, case):
        if mode != "prox_step":
            return "PruneOptimizer is an optimizer: measured in the prox_step mode only"
        if case.groups != "filters":
            return "measured with groups='filters' (its Dim0Grouper)"
        return None

    def sparse_step(self, case):
        from torchao.prototype.pat.optim import PruneOptimizer

        weights = regularized(case)
        chosen = {id(p) for p in weights}
        rest = [p for p in case.params if id(p) not in chosen]
        groups = [
            {
                "params": weights,
                "group_type": "Dim0Grouper",
                "prox_type": "ProxGroupLasso",
                "reg_lambda": case.strength,
            }
        ]
        if rest:
            groups.append({"params": rest})
        return PruneOptimizer(step_optimizer(case, groups)).step


def all_providers() -> List[Provider]:
    """Every provider, fastsparse first, then the baselines, then the references."""
    return [
        Fastsparse("triton"),
        Fastsparse("native"),
        Fastsparse("native", fuse_step=False),
        EagerOracle(),
        CompiledOracle("default"),
        CompiledOracle("max-autotune-no-cudagraphs"),
        Handwritten(),
        TorchPruning(),
        TorchaoPAT(),
        Copy(),
        PlainStep(),
    ]


PROVIDER_NAMES = tuple(p.name for p in all_providers())
