"""Rules: which parameters a `SparseOptimizer` sparsifies, by which groups, and how.

A rule names its parameters (by name, regex, module type and suffix, or a predicate), a grouping
and one action: a penalty (its gradient added before the step), a proximal step (after the step,
the threshold scaled by the learning rate) or a target sparsity (a hard constraint on the group
norms). `resolve` turns the rules into `Target`s: lists of tensors (or coupled groups) the fused
ops take in one call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastsparse.core.contract import GROUPINGS, KINDS, PROX_KINDS
from fastsparse.core.groups import CoupledGroup, default_parameters
from fastsparse.pruning import coupled_groups
from fastsparse.pruning.transformer import transformer_groups

# The proximal steps a rule may take: the prox kinds of `fastsparse.prox_`, and the sparse
# group lasso (l1 soft threshold, then group soft threshold: the exact prox of their sum).
RULE_PROX_KINDS = PROX_KINDS + ("sparse_group_lasso",)
# Groupings of a rule beyond the contract's: coupled channels traced from example inputs, a
# decoder's attention heads (key/value groups) and MLP neurons, k consecutive elements.
RULE_GROUPINGS = GROUPINGS + ("coupled", "heads", "neurons", "blocks")
SCOPES = ("layer", "global")

Match = Union[
    None,
    str,
    Tuple[type, str],
    Callable[[str, torch.Tensor], bool],
    Sequence[Union[str, Tuple[type, str], Callable[[str, torch.Tensor], bool]]],
]


@dataclass(frozen=True)
class Rule:
    """One sparsity rule of a `SparseOptimizer`.

    Args:
        params: which parameters: None (the weights of every Conv and Linear layer but the
            output layer, as `Regularizer` takes them; every tensor given without a model),
            a regex matched against the whole
            parameter name (``r"layer\\d\\..*conv\\d\\.weight"``; a plain name is a regex
            too), a pair ``(module type, parameter name)`` such as ``(nn.Conv2d, "weight")``,
            a predicate ``f(name, param) -> bool``, or a list of these (their union).
            Frozen parameters (``requires_grad=False``) are left out.
        groups: ``"filters"`` (dim 0), ``"channels"`` (dim 1), ``"kernels"``, None (the whole
            tensor), ``"coupled"`` (whole prunable channels, traced from the optimizer's
            `example_inputs`: what `fastsparse.prune` removes), ``"heads"`` / ``"neurons"``
            (a Llama-family decoder's attention key/value groups and MLP neurons), or
            ``"blocks"`` (runs of `block_size` consecutive elements of contiguous tensors).
            With coupled groups, heads and neurons, a rule takes the groups its parameters
            produce (their filters or rows: q/k/v for heads, gate/up for neurons) with every
            slice that goes with them (biases, norms, the consumers' input slices).
        penalty: a penalty kind of `fastsparse.KINDS`: ``strength * dR/dw`` is added to the
            gradients before every step (after unscaling and clipping).
        prox: a proximal step after every step (or every `every` steps): ``"l1"``,
            ``"group_lasso"``, ``"sparse_group_lasso"``, ``"l0"``, ``"group_l0"`` or
            ``"l0_group_lasso"``, with threshold ``strength * lr`` (the learning rates summed
            over the steps since the last prox). Pairs of strengths
            ``(element, group)`` for the two-stage kinds.
        strength: the penalty's multiplier or the prox's strength (>= 0).
        target: instead of a penalty or prox, a target sparsity in [0, 1): after each step,
            every group but the ``ceil((1 - target) * G)`` of largest l2 norm is zeroed
            (per tensor, or over all the rule's groups with ``scope="global"``).
        scope: ``"layer"`` or ``"global"``, for `target`.
        ramp_steps: with `target`, the steps of a cubic ramp from 0 to the target after the
            warmup (Zhu and Gupta, 2017): s(t) = target * (1 - (1 - t / ramp_steps) ** 3).
        block_size: the number of elements of a ``"blocks"`` group.

    Example:
        >>> rule = Rule((nn.Conv2d, "weight"), prox="group_lasso", strength=1e-3)
    """

    params: Match = None
    groups: Optional[str] = "filters"
    penalty: Optional[str] = None
    prox: Optional[str] = None
    strength: Union[float, Tuple[float, float]] = 0.0
    target: Optional[float] = None
    scope: str = "layer"
    ramp_steps: int = 0
    block_size: Optional[int] = None

    def __post_init__(self):
        actions = [a for a in ("penalty", "prox", "target") if getattr(self, a) is not None]
        if len(actions) != 1:
            raise ValueError(
                "a Rule takes exactly one of penalty=, prox= or target=, got "
                f"{', '.join(actions) or 'none'}"
            )
        if self.groups not in RULE_GROUPINGS:
            raise ValueError(
                f"unknown grouping {self.groups!r}; valid: {', '.join(map(str, RULE_GROUPINGS))}"
            )
        if self.penalty is not None and self.penalty not in KINDS:
            raise ValueError(f"unknown penalty {self.penalty!r}; valid: {', '.join(KINDS)}")
        if self.prox is not None and self.prox not in RULE_PROX_KINDS:
            raise ValueError(f"unknown prox {self.prox!r}; valid: {', '.join(RULE_PROX_KINDS)}")
        two_stage = self.prox in ("l0_group_lasso", "sparse_group_lasso")
        strengths = self.strength if isinstance(self.strength, tuple) else (self.strength,)
        if len(strengths) not in ((1, 2) if two_stage else (1,)):
            raise ValueError(f"strength {self.strength!r}: a pair only for the two-stage proxes")
        for s in strengths:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not s >= 0:
                raise ValueError(f"strength must be a number >= 0, got {self.strength!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; valid: {', '.join(SCOPES)}")
        if self.target is not None and not 0 <= self.target < 1:
            raise ValueError(f"target sparsity must be in [0, 1), got {self.target!r}")
        if int(self.ramp_steps) != self.ramp_steps or self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be an integer >= 0, got {self.ramp_steps!r}")
        if self.groups == "blocks":
            if not isinstance(self.block_size, int) or self.block_size < 1:
                raise ValueError(f"groups='blocks' needs block_size >= 1, got {self.block_size!r}")
        elif self.block_size is not None:
            raise ValueError("block_size is only for groups='blocks'")

    def sparsity(self, steps_after_warmup: int) -> float:
        """The target sparsity `steps_after_warmup` steps after the warmup (the cubic ramp).

        >>> round(Rule(target=0.8, ramp_steps=10).sparsity(5), 6)
        0.7
        """
        if self.target is None:
            raise ValueError("this rule has no target sparsity")
        if self.ramp_steps == 0 or steps_after_warmup >= self.ramp_steps:
            return self.target
        done = max(steps_after_warmup, 0) / self.ramp_steps
        return self.target * (1.0 - (1.0 - done) ** 3)


@dataclass(eq=False)
class Target:
    """A rule resolved on a model: the tensors (or coupled groups) one fused call takes.

    `names` and `params` are the matched parameters; `tensors` what the ops see (the params
    themselves, or their block views); `coupled` the coupled groups when the rule has them.
    `group_index` is the optimizer's param group of every param (one learning rate per call).
    """

    rule: Rule
    names: List[str]
    params: List[torch.Tensor]
    tensors: List[torch.Tensor]
    grouping: Optional[str]
    coupled: Optional[List[CoupledGroup]]
    group_index: int


def named_parameters(model) -> List[Tuple[str, torch.Tensor]]:
    """(name, tensor) of the trainable tensors of a module, a {name: tensor} dict or a list
    of tensors (named by position: "0", "1", ...)."""
    if isinstance(model, nn.Module):
        items = list(model.named_parameters())
    elif isinstance(model, dict):
        items = list(model.items())
    elif isinstance(model, (list, tuple)):
        items = [(str(i), t) for i, t in enumerate(model)]
    else:
        raise TypeError(
            "model must be an nn.Module, a {name: tensor} dict or a list of tensors, got "
            f"{type(model).__name__}"
        )
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a tensor")
    return [(n, t) for n, t in items if t.requires_grad]


def _matcher(match: Match, model) -> Callable[[str, torch.Tensor], bool]:
    if match is None:
        if not isinstance(model, nn.Module):
            return lambda name, p: True  # every tensor given
        defaults = {id(p) for p in default_parameters(model)}
        return lambda name, p: id(p) in defaults
    if isinstance(match, str):
        pattern = re.compile(match)
        return lambda name, p: pattern.fullmatch(name) is not None
    if isinstance(match, tuple) and len(match) == 2 and isinstance(match[0], type):
        if not isinstance(model, nn.Module):
            raise TypeError("matching by module type needs the model, not a list of tensors")
        module_type, suffix = match
        owned = set()
        for module_name, module in model.named_modules():
            if isinstance(module, module_type) and isinstance(
                getattr(module, suffix, None), torch.Tensor
            ):
                owned.add(f"{module_name}.{suffix}" if module_name else suffix)
        return lambda name, p: name in owned
    if callable(match):
        return match
    if isinstance(match, (list, tuple)):
        parts = [_matcher(m, model) for m in match]
        return lambda name, p: any(f(name, p) for f in parts)
    raise TypeError(
        "Rule.params takes None, a regex, a (module type, parameter name) pair, a predicate or a "
        f"list of these; got {type(match).__name__}"
    )


def resolve(
    rules: Sequence[Rule],
    model: Union[nn.Module, dict, Sequence[torch.Tensor]],
    param_groups: List[dict],
    example_inputs: Any = None,
) -> List[Target]:
    """The targets of `rules` on `model`: one per (rule, optimizer param group) with params.

    Raises:
        ValueError: a rule that matches nothing, a parameter matched by two rules or not
            optimized by the optimizer, ``groups="coupled"`` without example inputs, a
            non-contiguous or indivisible tensor for ``"blocks"``.
    """
    group_of = {id(p): i for i, g in enumerate(param_groups) for p in g["params"]}
    named = named_parameters(model)
    owner: dict = {}
    targets: List[Target] = []
    for index, rule in enumerate(rules):
        if not isinstance(rule, Rule):
            raise TypeError(f"rules must be fastsparse.Rule objects, got {type(rule).__name__}")
        matches = _matcher(rule.params, model)
        picked = [(n, p) for n, p in named if matches(n, p)]
        if not picked:
            raise ValueError(f"rule {index} ({rule.params!r}) matches no trainable parameter")
        for name, p in picked:
            if id(p) in owner:
                raise ValueError(
                    f"parameter {name!r} is matched by rules {owner[id(p)]} and {index}; "
                    "give each parameter one rule"
                )
            if id(p) not in group_of:
                raise ValueError(f"parameter {name!r} (rule {index}) is not in the optimizer")
            owner[id(p)] = index
        if rule.groups in ("coupled", "heads", "neurons"):
            targets.extend(_coupled_targets(rule, index, picked, model, group_of, example_inputs))
            continue
        by_group: dict = {}
        for name, p in picked:
            by_group.setdefault(group_of[id(p)], []).append((name, p))
        for gi, members in sorted(by_group.items()):
            names = [n for n, _ in members]
            params = [p for _, p in members]
            tensors, grouping = params, rule.groups
            if rule.groups == "blocks":
                tensors, grouping = [_blocks(n, p, rule.block_size) for n, p in members], "filters"
            targets.append(Target(rule, names, params, tensors, grouping, None, gi))
    return targets


def _blocks(name: str, p: torch.Tensor, k: int) -> torch.Tensor:
    if not p.is_contiguous() or p.numel() % k:
        raise ValueError(
            f"groups='blocks' needs contiguous tensors whose size divides by {k}: {name!r} has "
            f"shape {tuple(p.shape)}"
        )
    return p.detach().view(-1, k)


def _coupled_targets(rule, index, picked, model, group_of, example_inputs) -> List[Target]:
    """The coupled groups that a picked parameter produces (one of its dim-0 slices is in the
    group: a layer's filters or rows, not its input slices); every member must be optimized."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"groups={rule.groups!r} needs the model, not a list of tensors")
    if rule.groups == "coupled":
        if example_inputs is None:
            raise ValueError("groups='coupled' traces the model: pass example_inputs=")
        groups = coupled_groups(model, example_inputs)
    else:
        groups = transformer_groups(model)[rule.groups]
    wanted = {id(p) for _, p in picked}
    groups = [cg for cg in groups if any(m.dim == 0 and id(m.param) in wanted for m in cg.members)]
    if not groups:
        raise ValueError(f"rule {index}: the matched parameters produce no {rule.groups} group")
    by_group: dict = {}
    for cg in groups:
        indices = {group_of.get(id(m.param)) for m in cg.members}
        if None in indices:
            missing = next(m.name for m in cg.members if id(m.param) not in group_of)
            raise ValueError(f"rule {index}: {missing!r} of a coupled group is not optimized")
        if len(indices) > 1:
            raise ValueError(
                f"rule {index}: coupled group {cg.root!r} spans optimizer param groups with "
                "different settings; put its parameters in one param group"
            )
        by_group.setdefault(indices.pop(), []).append(cg)
    targets = []
    for gi, cgs in sorted(by_group.items()):
        seen: dict = {}
        for cg in cgs:
            for m in cg.members:
                seen.setdefault(id(m.param), (m.name, m.param))
        names = [n for n, _ in seen.values()]
        params = [p for _, p in seen.values()]
        targets.append(Target(rule, names, params, params, None, cgs, gi))
    return targets
