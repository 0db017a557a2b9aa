"""SparseOptimizer: any torch optimizer, with structured-sparsity rules in its step."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

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
        fuse_step: wrapping ``torch.optim.SGD``, apply a prox rule's step and prox in one
            pass over each group where the fused kernels serve its tensors (native CPU backend,
            fp32 / fp64): each weight, gradient and momentum buffer is read once and written
            once, instead of a step then a prox. The same values up to rounding.

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

        A closure is evaluated once, with gradients enabled, before anything else.
        """
        loss = None
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

    def _fused_steps(self) -> list:
        """Step and prox the targets that one fused pass serves; their indices.

        torch.optim.SGD only (not maximize, not differentiable): its momentum buffers are
        read and written in the wrapped optimizer's state, so that its state dict and later
        unfused steps go on as if it had stepped them itself.
        """
        if type(self.optimizer) is not torch.optim.SGD:
            return []
        from fastsparse.functional import sgd_prox_

        done = []
        for i, target in enumerate(self.sparsifier.targets):
            if not self.sparsifier.fusable(i):
                continue
            group = self.param_groups[target.group_index]
            if group.get("maximize") or group.get("differentiable"):
                continue
            params = target.params
            momentum = group["momentum"]
            states = [self.state[p] for p in params]
            old = [st.get("momentum_buffer") for st in states]
            if momentum != 0 and any(b is None for b in old) and not all(b is None for b in old):
                continue  # some buffers exist, some not: let the optimizer step them
            first = momentum != 0 and old[0] is None
            bufs = None
            if momentum != 0:
                bufs = [torch.empty_like(p) for p in params] if first else old
            t_elem, t_group = self.sparsifier.prox_thresholds(i)
            kind = target.rule.prox
            masks = sgd_prox_(
                params,
                kind,
                (t_elem, t_group)
                if kind == "l0_group_lasso"
                else (t_elem if kind in ("l1", "l0") else t_group),
                lr=group["lr"],
                momentum=momentum,
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                bufs=bufs,
                first=first,
                groups=target.grouping,
                backend=self.sparsifier.backend,
            )
            if masks is None:
                continue
            if first:
                for st, buf in zip(states, bufs):
                    st["momentum_buffer"] = buf
            done.append(i)
        return done

    def sparsity(self) -> dict:
        """Fraction of zero groups per matched parameter and in total (a host sync)."""
        return self.sparsifier.sparsity()

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
