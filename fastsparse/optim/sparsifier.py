"""Sparsifier: the rules of one training run, applied around each optimizer step.

`before_step()` adds the penalty gradients (after unscaling and clipping, before the update);
`after_step()` runs the proximal steps and target constraints on the updated weights, or, while
healing, re-zeroes what was zero. `SparseOptimizer` calls both from its `step`; the transformers
and Lightning callbacks call them from their hooks. All tensors of a rule that share a learning
rate go to one fused call; nothing of the weights' size is kept (no latent copies, no masks
unless `heal_elements`).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from fastsparse.core.checks import allocate_missing_grads
from fastsparse.core.contract import ELEMENT_PROX_KINDS, PROX_KINDS
from fastsparse.core.layout import group_count
from fastsparse.core.step import StepHooks
from fastsparse.functional import add_penalty_grad_, group_norms, prox_, scale_groups_
from fastsparse.optim.rules import Rule, Target, resolve
from fastsparse.reference import rebind


class Sparsifier(StepHooks):
    """Structured-sparsity rules applied around the steps of an optimizer: the step protocol
    (`fastsparse.core.step.StepHooks`) over `Rule`s.

    Args:
        model: the module whose parameters the rules name (or a {name: tensor} dict, or a
            list of tensors, named "0", "1", ...: rules by name, regex or predicate only).
        rules: `fastsparse.Rule` objects; each parameter may be named by one rule.
        optimizer: the optimizer whose steps the rules go around: its param groups hold the
            parameters, and their ``"lr"``, read at every step, scales the proximal steps.
        warmup_steps: steps with the plain optimizer before any rule acts.
        every: run the proximal steps and target constraints every `every` steps after the
            warmup. Their thresholds use the learning rates summed since the last run: right for
            the soft thresholds (l1, group_lasso), a larger cut for the hard ones (l0, group_l0)
            than `every=1` with the same strength.
        heal_from: from this step on the zeros are frozen: the rules stop; before each step
            one fused pass zeroes the gradients of the groups that were zero when healing began
            (so the optimizer's state takes nothing from them), and after it another re-zeroes
            those groups (which momentum or weight decay may have moved): fine-tuning cannot
            revive them.
        heal_elements: freeze zero elements rather than zero groups while healing (a bool
            mask of each parameter's size is kept).
        example_inputs: a batch to trace the model with, for rules with ``groups="coupled"``.
        backend: as in `fastsparse.prox_`.

    Example:
        >>> model = nn.Linear(8, 4)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> rules = Sparsifier(model, [Rule(prox="l1", strength=1e-2)], opt)
        >>> model(torch.randn(2, 8)).sum().backward()
        >>> rules.before_step(); opt.step(); rules.after_step()
    """

    def __init__(
        self,
        model: Union[nn.Module, dict, Sequence[torch.Tensor]],
        rules: Sequence[Rule],
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int = 0,
        every: int = 1,
        heal_from: Optional[int] = None,
        heal_elements: bool = False,
        example_inputs: Any = None,
        backend: str = "auto",
    ):
        for name, value, low in (("warmup_steps", warmup_steps, 0), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if heal_from is not None and (
            isinstance(heal_from, bool)
            or not isinstance(heal_from, int)
            or heal_from < warmup_steps
        ):
            raise ValueError(f"heal_from must be an integer >= warmup_steps, got {heal_from!r}")
        rules = [rules] if isinstance(rules, Rule) else list(rules)
        if not rules:
            raise ValueError("give at least one Rule")
        self.rules = rules
        self.optimizer = optimizer
        self.targets: List[Target] = resolve(rules, model, optimizer.param_groups, example_inputs)
        self.warmup_steps, self.every = warmup_steps, every
        self.heal_from, self.heal_elements = heal_from, heal_elements
        self.backend = backend
        self.steps = 0  # completed steps
        self._lr_since_prox = [0.0] * len(self.targets)
        self._step_lrs: Optional[List[float]] = None
        self._frozen: Optional[List[List[torch.Tensor]]] = None

    @property
    def healing(self) -> bool:
        return self.heal_from is not None and self.steps >= self.heal_from

    @property
    def acting(self) -> bool:
        """True while the rules act: after the warmup, before healing."""
        return self.steps >= self.warmup_steps and not self.healing

    # --- around the step -----------------------------------------------------------------------

    @torch.no_grad()
    def before_step(self) -> None:
        """Add the penalty rules' gradients (to be called after unscaling and clipping); at the
        first healing step, record what is zero before the update moves it."""
        # The learning rates of this step, read before any scheduler in the loop changes them
        # (Lightning steps its schedulers before the hook that ends a step).
        self._step_lrs = [self.optimizer.param_groups[t.group_index]["lr"] for t in self.targets]
        if self.healing:
            if self._frozen is None:
                self._frozen = [[_full(m) for m in self._zero_pattern(t)] for t in self.targets]
            for target, frozen in zip(self.targets, self._frozen):
                self._mask_grads(target, frozen)
        if not self.acting:
            return
        for target in self.targets:
            if target.rule.penalty is None:
                continue
            blocks = target.tensors is not target.params  # through views of the gradients
            staging = _bind_block_grads(target) if blocks else []
            add_penalty_grad_(
                _tensors(target),
                target.rule.penalty,
                float(target.rule.strength),
                groups=_groups(target),
                backend=self.backend,
            )
            for grad, staged in staging:
                grad.add_(staged.view(grad.shape))
            if blocks:
                for view in target.tensors:
                    view.grad = None

    @property
    def proxing(self) -> bool:
        """True when this step ends with the proximal steps and targets."""
        return self.acting and (self.steps - self.warmup_steps) % self.every == 0

    def fusable(self, index: int) -> bool:
        """True when target `index` takes a plain prox this step, which an optimizer step may
        apply in the same pass (`prox_threshold` gives its threshold)."""
        target = self.targets[index]
        return (
            self.proxing
            and target.rule.prox in PROX_KINDS
            and target.coupled is None
            and target.tensors is target.params
        )

    def prox_threshold(self, index: int):
        """The threshold of target `index`'s prox at this step, as `prox_` takes it for its kind
        (a pair (element, group) for the two-stage kinds): strength times the learning rates
        since its last prox, this step's included."""
        target = self.targets[index]
        lr = self._lr_since_prox[index]
        if self.acting:
            lr += self._lr(index)
        rule = target.rule
        strengths = rule.strength if isinstance(rule.strength, tuple) else (rule.strength,) * 2
        t_elem, t_group = strengths[0] * lr, strengths[1] * lr
        if rule.prox in ("l0_group_lasso", "sparse_group_lasso"):
            return t_elem, t_group
        return t_elem if rule.prox in ELEMENT_PROX_KINDS else t_group

    @torch.no_grad()
    def after_step(self, done: Sequence[int] = ()) -> None:
        """Prox steps and target constraints (or, healing, the re-zeroing); counts the step.
        `done`: the targets whose prox the optimizer step already applied (fused)."""
        if self.healing:
            if self._frozen is None:
                raise RuntimeError("after_step() without before_step() at the first healing step")
            for target, frozen in zip(self.targets, self._frozen):
                self._refreeze(target, frozen)
        elif self.acting:
            proxing = self.proxing
            for i, target in enumerate(self.targets):
                if proxing and target.rule.penalty is None and i not in done:
                    self._after_step(i)
                if proxing:
                    self._lr_since_prox[i] = 0.0
                else:
                    self._lr_since_prox[i] += self._lr(i)
        self.steps += 1
        self._step_lrs = None

    def _lr(self, index: int) -> float:
        """This step's learning rate of target `index` (as `before_step` read it)."""
        if self._step_lrs is not None:
            return self._step_lrs[index]
        return self.optimizer.param_groups[self.targets[index].group_index]["lr"]

    def _after_step(self, index: int) -> None:
        target = self.targets[index]
        rule, tensors, groups = target.rule, _tensors(target), _groups(target)
        if rule.target is not None:
            self._keep_largest(target, rule.sparsity(self.steps - self.warmup_steps))
            return
        threshold = self.prox_threshold(index)
        if rule.prox == "sparse_group_lasso":  # the exact prox of l1 + group lasso
            prox_(tensors, "l1", threshold[0], groups=groups, backend=self.backend)
            prox_(tensors, "group_lasso", threshold[1], groups=groups, backend=self.backend)
        else:
            prox_(tensors, rule.prox, threshold, groups=groups, backend=self.backend)

    def _keep_largest(self, target: Target, sparsity: float) -> None:
        """Zero all but the ceil((1 - s) * G) groups of largest norm (per tensor or global)."""
        tensors, groups = _tensors(target), _groups(target)
        norms = [_full(n) for n in group_norms(tensors, groups=groups, backend=self.backend)]
        if target.rule.scope == "global":
            flat = torch.cat(norms)
            keep = _top_mask(flat, math.ceil((1.0 - sparsity) * flat.numel()))
            masks = list(torch.split(keep, [n.numel() for n in norms]))
        else:
            masks = [_top_mask(n, math.ceil((1.0 - sparsity) * n.numel())) for n in norms]
        scale_groups_(tensors, masks, groups=groups, backend=self.backend)

    # --- healing -------------------------------------------------------------------------------

    def _zero_pattern(self, target: Target) -> List[torch.Tensor]:
        """What stays zero while healing: the groups (or elements) that are zero now."""
        if self.heal_elements:
            return [p.detach() != 0 for p in target.params]
        norms = group_norms(_tensors(target), groups=_groups(target), backend=self.backend)
        return [n > 0 for n in norms]

    def _mask_grads(self, target: Target, frozen: List[torch.Tensor]) -> None:
        """Zero the gradients of the frozen groups (elements) before the update: the optimizer's
        state (momentum, moments) then takes nothing from them."""
        if self.heal_elements:
            for p, alive in zip(target.params, frozen):
                if p.grad is not None:
                    p.grad.masked_fill_(~alive, 0)
            return
        if target.coupled is not None:
            grads = {id(p): p.grad for p in target.params}
            if any(g is None or g.shape != p.shape for p, g in zip(target.params, grads.values())):
                return
            scale_groups_(None, frozen, groups=rebind(target.coupled, grads), backend=self.backend)
            return
        grads, masks = [], []
        for p, view, alive in zip(target.params, target.tensors, frozen):
            grad = p.grad
            if grad is None or grad.shape != p.shape:
                continue
            if view.shape != p.shape:  # blocks: the gradient's own block view
                if not grad.is_contiguous():
                    continue
                grad = grad.view(view.shape)
            grads.append(grad)
            masks.append(alive)
        if grads:
            scale_groups_(grads, masks, groups=target.grouping, backend=self.backend)

    def _refreeze(self, target: Target, frozen: List[torch.Tensor]) -> None:
        """Re-zero the frozen groups (elements) that the update moved, in one fused pass."""
        if self.heal_elements:
            for p, alive in zip(target.params, frozen):
                p.masked_fill_(~alive, 0)
            return
        groups = target.coupled if target.coupled is not None else target.grouping
        scale_groups_(_tensors(target), frozen, groups=groups, backend=self.backend)

    # --- state and reporting -------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "lr_since_prox": list(self._lr_since_prox),
            "frozen": None if self._frozen is None else [list(f) for f in self._frozen],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["lr_since_prox"]) != len(self.targets):
            raise ValueError(
                f"the state has {len(state['lr_since_prox'])} rule targets, these rules "
                f"{len(self.targets)}: it was saved with other rules or another model"
            )
        self.steps = int(state["steps"])
        self._lr_since_prox = [float(v) for v in state["lr_since_prox"]]
        frozen = state["frozen"]
        if frozen is not None:
            for masks, target in zip(frozen, self.targets):
                expected = self._mask_shapes(target)
                if [tuple(m.shape) for m in masks] != expected:
                    raise ValueError(
                        f"the state's healing masks have shapes {[tuple(m.shape) for m in masks]}"
                        f", these rules' {expected}: saved with other rules or heal_elements"
                    )
            frozen = [
                [m.to(target.params[0].device) for m in masks]
                for masks, target in zip(frozen, self.targets)
            ]
        self._frozen = frozen

    def _mask_shapes(self, target: Target) -> list:
        if self.heal_elements:
            return [tuple(p.shape) for p in target.params]
        if target.coupled is not None:
            return [(cg.num_groups,) for cg in target.coupled]
        return [(group_count(t.shape, target.grouping),) for t in target.tensors]

    def sparsity(self) -> dict:
        """Per matched parameter (or coupled group root), the fraction of its groups that are
        zero; ``"total"``: over every group of every rule. Costs one group-norm pass per rule
        and a host sync: call it to log, not every step.

        >>> model = nn.Linear(4, 3)
        >>> _ = model.weight.data[0].zero_()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> Sparsifier(model, [Rule("weight", prox="l1")], opt).sparsity()
        {'weight': 0.3333333333333333, 'total': 0.3333333333333333}
        """
        out, dead, total = {}, 0, 0
        for target in self.targets:
            norms = group_norms(_tensors(target), groups=_groups(target), backend=self.backend)
            if target.coupled is not None:
                names = [cg.root for cg in target.coupled]
            else:
                names = target.names
            for name, n in zip(names, map(_full, norms)):
                zero = int((n == 0).sum())
                out[name] = zero / max(n.numel(), 1)
                dead, total = dead + zero, total + n.numel()
        out["total"] = dead / max(total, 1)
        return out


def _bind_block_grads(target: Target) -> list:
    """Give each block view the matching view of its parameter's gradient (zeros if none);
    a gradient that has no such view gets a staging buffer, to add back: [(gradient, buffer)]."""
    staging = []
    allocate_missing_grads(target.params)
    for p, view in zip(target.params, target.tensors):
        if p.grad.is_contiguous():
            view.grad = p.grad.view(view.shape)
        else:
            view.grad = torch.zeros(view.shape, dtype=p.grad.dtype, device=p.device)
            staging.append((p.grad, view.grad))
    return staging


def _groups(target: Target):
    return target.coupled if target.coupled is not None else target.grouping


def _tensors(target: Target):
    return None if target.coupled is not None else target.tensors


def _top_mask(norms: torch.Tensor, keep: int) -> torch.Tensor:
    """True at the `keep` largest entries of `norms`."""
    mask = torch.zeros(norms.shape, dtype=torch.bool, device=norms.device)
    if keep > 0:
        mask[torch.topk(norms, min(keep, norms.numel())).indices] = True
    return mask


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (group norms and masks are small); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
