"""SparseOptimizer: any torch optimizer, with structured-sparsity rules in its step."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from fastsparse.core.contract import AdamStepOptions, SGDStepOptions
from fastsparse.functional.prox import step_prox_
from fastsparse.optim.rules import Rule
from fastsparse.optim.sparsifier import Sparsifier


class SparseOptimizer(torch.optim.Optimizer):
    """A torch optimizer that trains with structured-sparsity rules.

    ``step()`` adds the penalty rules' gradients, steps the wrapped optimizer, then runs the
    proximal steps and target constraints (see `fastsparse.Rule`); the rules' tensors go to one
    fused call per rule and learning rate.

    Args:
        optimizer: the optimizer to wrap (SGD, Adam, AdamW, foreach or fused, ...). Its
            param groups and state are this optimizer's: LR schedulers, ``GradScaler``
            (``scaler.step(opt)`` unscales, then calls this step) and gradient clipping work on
            the wrapper as on the optimizer.
        model: the module whose parameters the rules name (or a {name: tensor} dict, or a
            list of tensors, named "0", "1", ...: rules by name, regex or predicate only).
        rules: `fastsparse.Rule` objects; each parameter may be named by one rule.
        warmup_steps, every, heal_from, heal_elements, example_inputs, backend: as in
            `fastsparse.optim.Sparsifier` (warmup before the rules act, prox every N steps,
            zeros frozen from step `heal_from` on).
        fuse_step: wrapping ``torch.optim.SGD``, ``Adam`` or ``AdamW``, apply a prox rule's step
            and prox in one pass over each group where the fused kernels serve its tensors
            (native CPU backend, fp32 / fp64): each weight, gradient and state buffer is read
            once and written once, instead of a step then a prox. The same values up to
            rounding.

    ``state_dict()`` holds the wrapped optimizer's state and the rules' (step count, learning
    rates since the last prox, healing masks): a run resumed from it follows the same
    trajectory as an uninterrupted one.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> opt = SparseOptimizer(
        ...     torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        ...     model,
        ...     [Rule((nn.Conv2d, "weight"), prox="group_lasso", strength=1e-3)],
        ... )
        >>> model(torch.randn(2, 3, 8, 8)).sum().backward()
        >>> opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: Union[nn.Module, dict, Sequence[torch.Tensor]],
        rules: Sequence[Rule],
        *,
        warmup_steps: int = 0,
        every: int = 1,
        heal_from: Optional[int] = None,
        heal_elements: bool = False,
        example_inputs: Any = None,
        backend: str = "auto",
        fuse_step: bool = True,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, SparseOptimizer):
            raise TypeError("optimizer is already a SparseOptimizer; give one the rules of both")
        sparsifier = Sparsifier(
            model,
            rules,
            optimizer,
            warmup_steps=warmup_steps,
            every=every,
            heal_from=heal_from,
            heal_elements=heal_elements,
            example_inputs=example_inputs,
            backend=backend,
        )
        # param_groups and state are the wrapped optimizer's, read through on every access
        # (its load_state_dict replaces them); Optimizer.__init__ only sets up the hooks.
        self.optimizer = optimizer
        self._registering = True
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self._registering = False
        self.sparsifier = sparsifier
        self.fuse_step = fuse_step

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list) -> None:
        if not self.__dict__.get("_registering"):
            self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        if not self.__dict__.get("_registering"):
            self.optimizer.state = value

    @property
    def rules(self) -> list:
        return self.sparsifier.rules

    @property
    def steps(self) -> int:
        """Completed steps."""
        return self.sparsifier.steps

    def step(self, closure: Optional[Callable[[], float]] = None):
        """Penalty gradients, the wrapped optimizer's step, then prox and targets (or healing).

        With SGD, Adam and AdamW a closure is evaluated once, with gradients enabled, before
        anything else. Any other optimizer gets the closure itself (LBFGS evaluates it several
        times per step), wrapped so that every evaluation adds the penalty rules' gradients.
        """
        loss = None
        if closure is not None and type(self.optimizer) not in _FUSED_STEPS:
            return self._step_through(closure)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sparsifier.before_step()
        done = self._fused_steps() if self.fuse_step else []
        # The wrapped optimizer skips parameters without a gradient: those of fused targets.
        hidden = [(p, p.grad) for i in done for p in self.sparsifier.targets[i].params]
        for p, _ in hidden:
            p.grad = None
        try:
            self.optimizer.step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        self.sparsifier.after_step(done)
        return loss

    def _step_through(self, closure: Callable[[], float]):
        """The wrapped optimizer's step with the closure, its gradients completed by the rules."""

        def evaluate():
            with torch.enable_grad():
                value = closure()
            self.sparsifier.before_step()
            return value

        loss = self.optimizer.step(evaluate)
        self.sparsifier.after_step()
        return loss

    def _fused_steps(self) -> list:
        """Step and prox the targets that one fused pass serves; their indices.

        torch.optim.SGD, Adam and AdamW (not maximize, differentiable, capturable, fused or
        amsgrad): their state (momentum buffers; step and moments) is read and written in the
        wrapped optimizer's own state, so that its state dict and later unfused steps go on as
        if it had stepped these parameters itself.
        """
        kind_of_step = _FUSED_STEPS.get(type(self.optimizer))
        if kind_of_step is None:
            return []
        done = []
        for i, target in enumerate(self.sparsifier.targets):
            if not self.sparsifier.fusable(i):
                continue
            group = self.param_groups[target.group_index]
            if any(group.get(flag) for flag in _UNFUSED_FLAGS):
                continue
            threshold = self.sparsifier.prox_threshold(i)
            if kind_of_step(self, target, group, target.rule.prox, threshold):
                done.append(i)
        return done

    def _fused_sgd(self, target, group, kind, threshold) -> bool:
        params, momentum = target.params, float(group["momentum"])
        states, bufs, first = [], None, True
        if momentum != 0:  # torch's SGD keeps no state without momentum
            states = [self.state[p] for p in params]
            old = [st.get("momentum_buffer") for st in states]
            if any(b is None for b in old) and not all(b is None for b in old):
                return False  # some buffers exist, some not: the optimizer steps them
            first = old[0] is None
            bufs = [torch.empty_like(p) for p in params] if first else old
        options = SGDStepOptions(
            lr=float(group["lr"]),
            momentum=momentum,
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            first=first,
        )
        masks = step_prox_(
            params, kind, threshold, options, [] if bufs is None else [bufs],
            groups=target.grouping, backend=self.sparsifier.backend,
        )  # fmt: skip
        if masks is not None and first and momentum != 0:
            for st, buf in zip(states, bufs):
                st["momentum_buffer"] = buf
        return masks is not None

    def _fused_adam(self, target, group, kind, threshold) -> bool:
        params = target.params
        states = [self.state[p] for p in params]
        fresh = [len(st) == 0 for st in states]
        if any(fresh) and not all(fresh):
            return False
        if all(fresh):  # as torch's Adam initializes its state (a CPU step counter)
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            steps = [torch.tensor(0.0, dtype=scalar, device="cpu") for _ in params]
            exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
            exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        else:
            steps = [st["step"] for st in states]
            exp_avgs = [st["exp_avg"] for st in states]
            exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        counts = {float(t) for t in steps}
        if len(counts) != 1:
            return False
        decoupled = group.get(
            "decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)
        )
        options = AdamStepOptions.at_step(
            int(counts.pop()) + 1,
            lr=float(group["lr"]),
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=decoupled,
        )
        masks = step_prox_(
            params, kind, threshold, options, [exp_avgs, exp_avg_sqs], groups=target.grouping,
            backend=self.sparsifier.backend,
        )  # fmt: skip
        if masks is None:
            return False
        for st, step, m, v in zip(states, steps, exp_avgs, exp_avg_sqs):
            step += 1
            st.update(step=step, exp_avg=m, exp_avg_sq=v)
        return True

    def sparsity(self) -> dict:
        """Fraction of zero groups per matched parameter and in total (a host sync)."""
        return self.sparsifier.sparsity()

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer keeps only its defaults, state and param groups; the wrapper is
        # its wrapped optimizer and rules.
        return self.__dict__.copy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group to the wrapped optimizer (no rule covers its parameters)."""
        if self.__dict__.get("_registering"):  # Optimizer.__init__: the groups are already there
            return
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict and the rules' state."""
        return {"optimizer": self.optimizer.state_dict(), "sparsity": self.sparsifier.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore `state_dict()`: a resumed run continues as an uninterrupted one would."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"optimizer", "sparsity"}:
            raise ValueError(
                "not a SparseOptimizer state dict (expected keys 'optimizer' and 'sparsity'); "
                "load a plain optimizer's state with .optimizer.load_state_dict()"
            )
        previous = self.sparsifier.state_dict()
        self.sparsifier.load_state_dict(state_dict["sparsity"])
        try:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except Exception:
            self.sparsifier.load_state_dict(previous)
            raise

    def __repr__(self) -> str:
        inner = "\n    ".join(repr(self.optimizer).split("\n"))
        rules = "\n    ".join(repr(r) for r in self.rules)
        return f"SparseOptimizer(\n    {inner}\n    rules:\n    {rules}\n)"


# The optimizers whose step the fused kernels take over, and the options that keep them out.
_FUSED_STEPS = {
    torch.optim.SGD: SparseOptimizer._fused_sgd,
    torch.optim.Adam: SparseOptimizer._fused_adam,
    torch.optim.AdamW: SparseOptimizer._fused_adam,
}
_UNFUSED_FLAGS = ("maximize", "differentiable", "capturable", "fused", "amsgrad")
