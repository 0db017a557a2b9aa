"""What pruning would remove, measured: per-layer filters, parameters and multiply-adds."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from fastsparse.core.checks import check_real
from fastsparse.core.groups import CoupledGroup
from fastsparse.pruning.common import CONV, eval_forward
from fastsparse.pruning.graph import trace
from fastsparse.pruning.importance import producer_norms
from fastsparse.pruning.prune import prune_traced
from fastsparse.pruning.structure import Structure, structure_of
from fastsparse.pruning.transformer import block_groups, blocks_named, prune_blocks, removal_norms


def count_macs(model: nn.Module, example_inputs: Any) -> Dict[str, int]:
    """Multiply-adds of each conv/linear layer for one eval forward of `example_inputs`.

    Conv: output elements × in_channels/groups × kernel size; transposed conv: input elements ×
    out_channels/groups × kernel size; Linear: output elements × in_features. Bias additions,
    BatchNorm and activations are not counted. Layers called twice count twice.

    Example::

        >>> count_macs(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 10, 10))
        {'': 13824}
    """
    macs: Dict[str, int] = {}

    def hook_for(name: str) -> Callable:
        def hook(module, inputs, output):
            if isinstance(module, CONV):
                per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
                if module.transposed:
                    per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
                    count = inputs[0].numel() * per_input
                else:
                    count = output.numel() * per_output
            else:
                count = output.numel() * module.in_features
            macs[name] = macs.get(name, 0) + count

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (CONV, nn.Linear)):
            macs[name] = 0
            handles.append(module.register_forward_hook(hook_for(name)))
    try:
        eval_forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return macs


@dataclass
class LayerSparsity:
    """One conv/linear layer of a :class:`SparsityReport`.

    Attributes:
        name, type: module name and class name.
        filters: out-channels (rows) before pruning.
        alive: filters whose coupled group norm is > threshold (for layers outside every coupled
            group, `prunable` is False and `alive` counts rows of weight+bias with norm >
            threshold, for information).
        filters_after: out-channels of the pruned model (alive, or 1 when all are dead).
        params, params_after: the layer's own parameters (weight and bias).
        macs, macs_after: multiply-adds for one forward of the example inputs.
        constant: alive filters whose own weight and bias are zero (norm <= threshold): what
            follows them (a norm's shift) makes a constant, not zero, output, so they are kept
            (not folded into the consumers' biases).
    """

    name: str
    type: str
    filters: int
    alive: int
    filters_after: int
    prunable: bool
    params: int
    params_after: int
    macs: int
    macs_after: int
    constant: int = 0


@dataclass
class SparsityReport:
    """Per-layer filters, parameters and multiply-adds before and after `prune`.

    ``params``/``params_after`` count every parameter of the model (BatchNorm included);
    ``macs``/``macs_after`` sum the conv/linear multiply-adds of one forward of the example inputs.
    ``print(report)`` shows a table.
    """

    threshold: float
    layers: List[LayerSparsity] = field(default_factory=list)
    params: int = 0
    params_after: int = 0
    macs: int = 0
    macs_after: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (layer, why it stays whole)

    def format(self) -> str:
        """The report as a text table."""

        def change(before: int, after: int) -> str:
            pct = 100.0 * (after - before) / before if before else 0.0
            return f"{before:,} -> {after:,} ({pct:+.1f}%)"

        header = ("layer", "type", "filters", "alive", "kept", "params", "MACs")
        rows = [
            (
                layer.name,
                layer.type,
                str(layer.filters),
                str(layer.alive) if layer.prunable else f"{layer.alive} (fixed)",
                str(layer.filters_after),
                change(layer.params, layer.params_after),
                change(layer.macs, layer.macs_after),
            )
            for layer in self.layers
        ]
        total = ("total", "", "", "", "", change(self.params, self.params_after))
        total += (change(self.macs, self.macs_after),)
        widths = [max(len(r[i]) for r in [header, *rows, total]) for i in range(len(header))]

        def line(row) -> str:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(header))
        title = f"sparsity report (dead: producers' norm <= {self.threshold:g})"
        body = [line(r) for r in rows]
        notes = [f"not prunable, left whole: {root}: {why}" for root, why in self.skipped]
        notes += [
            f"{layer.name}: {layer.constant} filter(s) with zero weights feed a constant output "
            "(a norm's shift), kept"
            for layer in self.layers
            if layer.constant
        ]
        return "\n".join([title, line(header), rule, *body, rule, line(total), *notes])

    __str__ = format


def sparsity_report(
    model: nn.Module, example_inputs: Any, threshold: float = 0.0
) -> SparsityReport:
    """Filters total/alive, parameters and multiply-adds per conv/linear layer, before and after.

    "After" is measured on the model `prune(model, example_inputs, threshold)` returns, so the
    numbers are exact. `model` is not modified. For a decoder transformer (Llama family) the
    groups are its attention key/value groups and MLP neurons: the alive rows of q/k/v and
    gate/up are those of the live groups; o/down/lm_head rows are fixed.

    Example::

        >>> from fastsparse.workflow.models import LeNet5
        >>> report = sparsity_report(LeNet5(), torch.randn(1, 1, 28, 28))
        >>> report.params, report.params_after
        (431080, 431080)
        >>> print(report)  # doctest: +SKIP
    """
    threshold = check_real("threshold", threshold)
    return sparsity_report_as(structure_of(model), model, example_inputs, threshold)


def sparsity_report_as(
    structure: Structure, model: nn.Module, example_inputs: Any, threshold: float
) -> SparsityReport:
    """`sparsity_report` of a model whose `structure_of` the caller has decided (threshold
    checked)."""
    work = copy.deepcopy(model)
    if structure.is_decoder:  # heads and neurons, as fastsparse.prune removes them
        names = structure.block_names
        transformer = block_groups(blocks_named(work, names))
        groups, skipped = transformer["heads"] + transformer["neurons"], []
        norms = removal_norms(transformer)
        norms = norms["heads"] + norms["neurons"]
        prune_work = lambda: prune_blocks(  # noqa: E731
            work, names, example_inputs, threshold, verify=True
        )
    else:
        traced = trace(work, example_inputs)  # first: a model that cannot be traced fails here
        groups, skipped = traced.groups, list(traced.skipped)
        norms = producer_norms(groups)
        prune_work = lambda: prune_traced(traced, example_inputs, threshold, verify=True)  # noqa: E731
    macs = count_macs(work, example_inputs)
    params = {
        name: sum(p.numel() for p in m.parameters(recurse=False))
        for name, m in work.named_modules()
    }
    total_params = sum(p.numel() for p in work.parameters())
    layers = {
        name: (m, type(m).__name__, _out_channels(m))
        for name, m in work.named_modules()
        if isinstance(m, (CONV, nn.Linear))
    }
    kept_rows = _kept_rows_per_layer(groups, norms, threshold)
    alive, constant = {}, {}
    for name, (module, _, _) in layers.items():
        own_alive = _row_norms(module) > threshold
        if name in kept_rows:
            rows, kept = kept_rows[name]
            alive[name] = (int(kept.sum()), True)
            constant[name] = int((kept & ~own_alive[rows]).sum())
        else:
            alive[name] = (int(own_alive.sum()), False)
    pruned = prune_work()
    modules_after = dict(pruned.named_modules())
    macs_after = count_macs(pruned, example_inputs)
    report = SparsityReport(threshold, params=total_params, macs=sum(macs.values()))
    report.params_after = sum(p.numel() for p in pruned.parameters())
    report.macs_after = sum(macs_after.values())
    report.skipped = skipped
    for name, (_, type_name, filters) in layers.items():
        after = modules_after[name]
        report.layers.append(
            LayerSparsity(
                name=name,
                type=type_name,
                filters=filters,
                alive=alive[name][0],
                filters_after=_out_channels(after),
                prunable=alive[name][1],
                params=params[name],
                params_after=sum(p.numel() for p in after.parameters(recurse=False)),
                macs=macs[name],
                macs_after=macs_after[name],
                constant=constant.get(name, 0),
            )
        )
    return report


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, CONV) else module.out_features


def _kept_rows_per_layer(
    groups: List[CoupledGroup], norms: List, threshold: float
) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Layer name -> (row indices, kept) for every layer whose out-rows are in a coupled group:
    kept[i] is whether row rows[i] stays; `norms`: per group, the [G] norms that decide whether
    a channel is dead."""
    kept_rows = {}
    for group, group_norms in zip(groups, norms):
        for m in group.members:
            module_name, _, attr = m.name.rpartition(".")
            if attr == "weight" and m.dim == 0 and module_name not in kept_rows:
                kept_rows[module_name] = (m.index, group_norms[m.group] > threshold)
    return kept_rows


def _row_norms(module: nn.Module) -> torch.Tensor:
    """l2 norm of each out-row of a conv/linear layer's weight and bias (fp32)."""
    rows = module.weight.detach().flatten(1).float().square().sum(1)
    if module.bias is not None:
        rows = rows + module.bias.detach().float().square()
    return rows.sqrt()
