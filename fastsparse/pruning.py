"""Coupled groups, sparsity report and lossless physical pruning (Torch-Pruning does the surgery).

Workflow::

    groups = fastsparse.coupled_groups(model, x)          # trace once
    # train with a penalty on `groups`, then zero the dead groups
    fastsparse.prox_(model, "group_l0", t, groups=groups)
    print(fastsparse.sparsity_report(model, x))
    small = fastsparse.prune(model, x)                     # a new, physically smaller model

**Coupled groups.** Removing out-channel c of a layer also removes its bias, the following
BatchNorm's scale, shift and running statistics, the in-channel slice c of every consumer (several
Linear columns after a flatten), the depthwise filter that carries c, and, through residual
additions, channel c of every layer added to it. `coupled_groups` traces these with Torch-Pruning's
``DependencyGraph`` and returns them as :class:`~fastsparse.reference.CoupledGroup` (one per root
layer, G groups each).

**Dead rule (lossless).** A channel is removable only when its whole coupled group (producers'
filters, biases, BatchNorm scales *and shifts*, and the consumers' in-slices) has l2 norm <= t. A
filter whose conv weight and bias are zero but whose BatchNorm shift is not makes a constant
channel: its group norm is > 0, so it stays. `prune` first zeroes the dead groups (the same rule as
``prox_(..., "group_l0", t, groups=...)``) and then removes them, so in eval mode the pruned model
computes what the thresholded unpruned model computes, up to summation order; it checks this on
the example inputs before returning.

**Not prunable (left whole, documented).** Groups that reach the model's outputs (the classifier's
out-features are the outputs) and groups that would change the model's input channels (a
depthwise conv or BatchNorm fed directly by the input). A layer keeps at least one channel: when
all its groups are dead, the one with the largest norm stays (zeroed).

**Supported layers.** ``nn.Conv1d/2d/3d`` (groups = 1 or depthwise), ``nn.Linear``,
``nn.BatchNorm1d/2d/3d`` and parameter-free ops (activations, pooling, flatten, add, cat, ...).
A coupled group touching any other layer with parameters (LayerNorm, GroupNorm, grouped or
transposed convs, raw ``nn.Parameter`` s...) raises :class:`PruningError` naming it.

**Saving.** Either ``torch.save(pruned, path)`` and ``torch.load(path, weights_only=False)`` (the
model's class must be importable), or ``torch.save(pruned.state_dict(), path)`` and
``load_pruned(fresh_unpruned_model, torch.load(path))``, which resizes the layers of a freshly built
model to the saved shapes (works with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from fastsparse import reference
from fastsparse.reference import CoupledGroup, CoupledMember

__all__ = [
    "CoupledGroup",
    "CoupledMember",
    "LayerSparsity",
    "PruningError",
    "SparsityReport",
    "coupled_groups",
    "count_macs",
    "load_pruned",
    "prune",
    "sparsity_report",
]

_CONV = nn.modules.conv._ConvNd
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_SUPPORTED = "Conv1d/2d/3d (groups=1 or depthwise), Linear, BatchNorm1d/2d/3d"


class PruningError(RuntimeError):
    """A model cannot be traced or pruned; the message names the layer when there is one."""


# ------------------------------------------------------------------------------------ helpers


def _run(model: nn.Module, example_inputs: Any):
    """Call the model: a dict is passed as keywords, a tuple/list as positional arguments."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def _flatten_tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten_tensors(o)]
    return []


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, torch.Tensor) and threshold.numel() == 1:
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return float(threshold)


def _is_depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _eval_forward(model: nn.Module, example_inputs: Any):
    """Forward in eval mode without grad, restoring every module's training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return _run(model, example_inputs)
    finally:
        for m, training in modes:
            m.train(training)


# ---------------------------------------------------------------------------- coupled groups


@dataclass
class _Traced:
    """A dependency graph built on `model` (a private copy) and its coupled groups."""

    model: nn.Module
    graph: Any  # torch_pruning.DependencyGraph
    groups: List[CoupledGroup]
    roots: List[nn.Module]  # root module of each group


def _trace(model: nn.Module, example_inputs: Any) -> _Traced:
    """Build Torch-Pruning's dependency graph on `model` (modified: use a copy) and its groups."""
    import torch_pruning as tp

    outputs: List[Any] = []

    def forward_fn(m, x):
        out = _run(m, x)
        outputs.append(out)
        return out

    for p in model.parameters():  # tracing follows autograd: frozen layers must be seen too
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=forward_fn, verbose=False
            )
    except Exception as e:
        raise PruningError(
            f"cannot trace {type(model).__name__} with the example inputs ({type(e).__name__}: {e})"
        ) from e
    output_fns = {t.grad_fn for out in outputs for t in _flatten_tensors(out)}
    output_fns.discard(None)
    if not output_fns:
        raise PruningError(
            f"cannot trace {type(model).__name__}: no output depends on its parameters"
        )

    module_names = {id(m): n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters()}
    layers = [n for n, m in model.named_modules() if isinstance(m, (_CONV, nn.Linear))]
    found = []
    for tp_group in graph.get_all_groups(root_module_types=(_CONV, nn.Linear)):
        root = tp_group[0].dep.target.module
        group = _coupled_group(graph, tp_group, module_names, param_names, output_fns, layers)
        if group is not None:
            found.append((group, root))
    found.sort(key=lambda pair: layers.index(pair[0].root))  # in module order
    return _Traced(model, graph, [g for g, _ in found], [r for _, r in found])


def _coupled_group(
    graph, tp_group, module_names, param_names, output_fns, layer_names
) -> Optional[CoupledGroup]:
    """Translate one Torch-Pruning group into a CoupledGroup (None when it is not prunable)."""
    from torch_pruning import ops

    dummy = (
        ops.OPTYPE.ELEMENTWISE,
        ops.OPTYPE.CONCAT,
        ops.OPTYPE.SPLIT,
        ops.OPTYPE.RESHAPE,
        ops.OPTYPE.UNBIND,
        ops.OPTYPE.EXPAND,
        ops.OPTYPE.SLICE,
        ops.OPTYPE.OUTPUT,
    )
    root = tp_group[0].dep.target.module
    num_groups = graph.get_out_channels(root)
    # (id(param), dim) -> (name, param, dim, {slice index: group id})
    slices: Dict[Tuple[int, int], Tuple[str, torch.Tensor, int, Dict[int, int]]] = {}
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        changes_out = graph.is_out_channel_pruning_fn(handler)
        changes_in = graph.is_in_channel_pruning_fn(handler)
        if node.type == ops.OPTYPE.OUTPUT or (changes_out and node.grad_fn in output_fns):
            return None  # the channels are model outputs
        if node.type in dummy:
            continue
        if changes_in and not node.inputs and isinstance(module, (_CONV, nn.Linear, _BATCHNORM)):
            return None  # the channels are the model's input channels
        if isinstance(module, nn.Parameter):
            raise PruningError(
                f"parameter {param_names.get(id(module), tuple(module.shape))!r} is used outside "
                f"a supported layer ({_SUPPORTED}); it cannot be pruned"
            )
        name = module_names.get(id(module), type(module).__name__)
        if isinstance(module, _CONV):
            if module.transposed or not (module.groups == 1 or _is_depthwise(module)):
                raise PruningError(
                    f"layer {name!r} ({module}) is not supported: transposed and grouped "
                    f"convolutions cannot be pruned yet (supported: {_SUPPORTED})"
                )
            out_rows = changes_out or _is_depthwise(module)
            dims = {"weight": 0, "bias": 0} if out_rows else {"weight": 1}
        elif isinstance(module, nn.Linear):
            dims = {"weight": 0, "bias": 0} if changes_out else {"weight": 1}
        elif isinstance(module, _BATCHNORM):
            dims = {"weight": 0, "bias": 0}
        else:
            raise PruningError(
                f"layer {name!r} ({type(module).__name__}) is not supported: removing a channel "
                f"from it is not lossless or not implemented (supported: {_SUPPORTED})"
            )
        for attr, dim in dims.items():
            param = getattr(module, attr, None)
            if not isinstance(param, torch.Tensor):
                continue
            entry = (param_names[id(param)], param, dim, {})
            mapping = slices.setdefault((id(param), dim), entry)[3]
            for idx, root_idx in zip(item.idxs, item.root_idxs):
                mapping.setdefault(int(idx), int(root_idx))
    # Members in parameter (module) order; the root is the first conv/linear whose out-channels
    # are in the group, so that group g is its out-channel g.
    order = {name: i for i, name in enumerate(param_names.values())}
    members = []
    for name, param, dim, mapping in sorted(slices.values(), key=lambda e: (order[e[0]], e[2])):
        index = sorted(mapping)
        members.append(
            CoupledMember(
                name,
                param,
                dim,
                torch.tensor(index, dtype=torch.int64),
                torch.tensor([mapping[i] for i in index], dtype=torch.int64),
            )
        )
    root_name = module_names[id(root)]
    for m in members:
        layer, _, attr = m.name.rpartition(".")
        is_out_rows = attr == "weight" and m.dim == 0 and layer in layer_names
        if is_out_rows and len(m.index) == num_groups and torch.equal(m.index, m.group):
            root_name = layer
            break
    return CoupledGroup(root_name, num_groups, tuple(members))


def coupled_groups(model: nn.Module, example_inputs: Any) -> List[CoupledGroup]:
    """Trace which parameter slices must be zeroed or removed together, channel by channel.

    One :class:`~fastsparse.reference.CoupledGroup` per root layer (a conv or linear layer whose
    out-channels can go), with G = its out-channels. Member m of group g: the slices
    ``m.param.select(m.dim, m.index[j])`` with ``m.group[j] == g``; the members' tensors are the
    model's own parameters, so penalties and prox steps on the groups act on the model.

    The model is traced on a copy: its parameters, modes and hooks are left as they are.
    Excluded: groups whose channels are model outputs (the classifier's out-features) or model
    inputs. See the module docstring for the supported layers.

    Args:
        model: the network.
        example_inputs: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
            (``model(**x)``); a batch of one is enough.

    Returns:
        A list of CoupledGroup (an empty list when nothing is prunable).

    Raises:
        PruningError: the model cannot be traced, or a group touches an unsupported layer.

    Example::

        >>> from fastsparse.models import LeNet5
        >>> groups = coupled_groups(LeNet5(), torch.randn(1, 1, 28, 28))
        >>> [(g.root, g.num_groups) for g in groups]
        [('features.0', 20), ('features.3', 50), ('classifier.0', 500)]
        >>> groups[1]
        CoupledGroup(root='features.3', num_groups=50, members=[features.3.weight[dim 0], \
features.3.bias[dim 0], classifier.0.weight[dim 1]])
    """
    traced = _trace(copy.deepcopy(model), example_inputs)
    params = dict(model.named_parameters())
    return [
        CoupledGroup(
            g.root,
            g.num_groups,
            tuple(
                CoupledMember(m.name, params[m.name], m.dim, m.index, m.group) for m in g.members
            ),
        )
        for g in traced.groups
    ]


# ------------------------------------------------------------------------------------ pruning


def _dead_channels(groups: List[CoupledGroup], threshold: float) -> List[List[int]]:
    """Per group, the channels to remove: norm <= threshold, but never all of them."""
    dead = []
    for norms in reference.coupled_group_norms(groups):
        is_dead = norms <= threshold
        if bool(is_dead.all()) and norms.numel():
            is_dead[int(torch.argmax(norms))] = False
        dead.append(torch.nonzero(is_dead).flatten().tolist())
    return dead


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def _prune_traced(traced: _Traced, example_inputs: Any, threshold: float, verify: bool):
    """Zero the dead groups of the traced copy, remove them, check outputs. Modifies the copy."""
    model, graph = traced.model, traced.graph
    dead = _dead_channels(traced.groups, threshold)
    reference.prox_(None, "group_l0", threshold, traced.groups)
    expected = _flatten_tensors(_eval_forward(model, example_inputs)) if verify else []
    for group, root, channels in zip(traced.groups, traced.roots, dead):
        if not channels:
            continue
        pruning_fn = graph.get_pruner_of_module(root).prune_out_channels
        try:
            graph.get_pruning_group(root, pruning_fn, channels).prune()
        except Exception as e:
            raise PruningError(
                f"removing channels of layer {group.root!r} failed ({type(e).__name__}: {e})"
            ) from e
    if verify:
        try:
            got = _flatten_tensors(_eval_forward(model, example_inputs))
        except Exception as e:
            raise PruningError(
                f"the pruned {type(model).__name__} fails on the example inputs "
                f"({type(e).__name__}: {e}); an operation the dependency graph does not model "
                "probably ties channels"
            ) from e
        for a, b in zip(expected, got):
            if a.shape != b.shape:
                raise PruningError(f"pruning changed an output shape: {a.shape} -> {b.shape}")
            if a.is_floating_point():
                diff = (a - b).abs().max().item() if a.numel() else 0.0
                scale = 1.0 + (a.abs().max().item() if a.numel() else 0.0)
                if not diff <= _tolerance(a.dtype) * scale:
                    raise PruningError(
                        f"pruning {type(model).__name__} is not lossless on the example inputs "
                        f"(max abs difference {diff:.3g}); an operation the dependency graph "
                        "does not model probably mixes channels"
                    )
    return model


def prune(
    model: nn.Module, example_inputs: Any, threshold: float = 0.0, *, verify: bool = True
) -> nn.Module:
    """Return a new, physically smaller copy of `model` without its dead coupled groups.

    A channel is dead when its coupled group's l2 norm (filters, biases, BatchNorm scales and
    shifts, consumers' in-slices) is <= `threshold`. The copy's dead groups are zeroed, then
    removed with Torch-Pruning, so in eval mode the result computes what the unpruned model
    computes after ``prox_(model, "group_l0", threshold, groups=coupled_groups(model, x))``
    (max abs difference ~1e-6 in fp32, summation order only).

    All or nothing: `model` is never modified; any failure raises and returns nothing.

    Args:
        model: the trained network (any mode, device, dtype).
        example_inputs: as in :func:`coupled_groups`.
        threshold: t >= 0; 0 removes exactly-zero groups only.
        verify: compare outputs on `example_inputs` before and after the removal (eval mode)
            and raise if they differ; keep it on unless the forward is expensive.

    Returns:
        The pruned copy, in the same training mode as `model`, with the same ``requires_grad``
        flags.

    Raises:
        ValueError: negative or NaN threshold.
        PruningError: the model cannot be traced, has an unsupported layer in a coupled group
            (named in the message), or the pruned copy does not reproduce the outputs.

    Example::

        >>> from fastsparse.models import LeNet5
        >>> model, x = LeNet5(), torch.randn(1, 1, 28, 28)
        >>> with torch.no_grad():
        ...     model.features[0].weight[:5] = 0
        ...     model.features[0].bias[:5] = 0
        ...     model.features[3].weight[:, :5] = 0
        >>> prune(model, x).features[0]
        Conv2d(1, 15, kernel_size=(5, 5), stride=(1, 1))
    """
    threshold = _check_threshold(threshold)
    work = copy.deepcopy(model)
    _prune_traced(_trace(work, example_inputs), example_inputs, threshold, verify)
    for m, original in zip(work.modules(), model.modules()):
        m.train(original.training)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in work.named_parameters():
        p.requires_grad_(flags.get(n, True))
    return work


def load_pruned(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a pruned model: resize a freshly built unpruned `model` to `state_dict`'s shapes.

    Returns a new module (``model`` is left as is) whose Conv/Linear/BatchNorm layers have the
    channel counts found in `state_dict`, with `state_dict` loaded (strict).

    Example::

        >>> torch.save(pruned.state_dict(), "pruned.pt")                   # doctest: +SKIP
        >>> model = load_pruned(LeNet5(), torch.load("pruned.pt"))         # doctest: +SKIP
    """
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in new.named_modules():
            prefix = f"{name}." if name else ""
            weight = state_dict.get(prefix + "weight")
            if isinstance(module, _CONV) and weight is not None and not module.transposed:
                if _is_depthwise(module):
                    module.in_channels = module.out_channels = module.groups = weight.shape[0]
                else:
                    module.out_channels = weight.shape[0]
                    module.in_channels = weight.shape[1] * module.groups
            elif isinstance(module, nn.Linear) and weight is not None:
                module.out_features, module.in_features = weight.shape
            elif isinstance(module, _BATCHNORM):
                stats = state_dict.get(prefix + "running_mean")
                source = weight if weight is not None else stats
                if source is None:
                    continue
                module.num_features = source.shape[0]
            else:
                continue
            for key, tensor in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)
            ):
                saved = state_dict.get(prefix + key)
                if saved is not None and saved.shape != tensor.shape:
                    resized = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                    if isinstance(tensor, nn.Parameter):
                        setattr(module, key, nn.Parameter(resized, tensor.requires_grad))
                    else:
                        setattr(module, key, resized)
    new.load_state_dict(state_dict, strict=True)
    return new


# ---------------------------------------------------------------------------- sparsity report


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
            if isinstance(module, _CONV):
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
        if isinstance(module, (_CONV, nn.Linear)):
            macs[name] = 0
            handles.append(module.register_forward_hook(hook_for(name)))
    try:
        _eval_forward(model, example_inputs)
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
        title = f"sparsity report (dead: coupled group norm <= {self.threshold:g})"
        body = [line(r) for r in rows]
        return "\n".join([title, line(header), rule, *body, rule, line(total)])

    __str__ = format


def sparsity_report(
    model: nn.Module, example_inputs: Any, threshold: float = 0.0
) -> SparsityReport:
    """Filters total/alive, parameters and multiply-adds per conv/linear layer, before and after.

    "After" is measured on the model `prune(model, example_inputs, threshold)` returns, so the
    numbers are exact. `model` is not modified.

    Example::

        >>> from fastsparse.models import LeNet5
        >>> report = sparsity_report(LeNet5(), torch.randn(1, 1, 28, 28))
        >>> report.params, report.params_after
        (431080, 431080)
        >>> print(report)  # doctest: +SKIP
    """
    threshold = _check_threshold(threshold)
    work = copy.deepcopy(model)
    traced = _trace(work, example_inputs)  # first: a model that cannot be traced fails here
    macs = count_macs(work, example_inputs)
    params = {
        name: sum(p.numel() for p in m.parameters(recurse=False))
        for name, m in work.named_modules()
    }
    total_params = sum(p.numel() for p in work.parameters())
    layers = {
        name: (m, type(m).__name__, _out_channels(m))
        for name, m in work.named_modules()
        if isinstance(m, (_CONV, nn.Linear))
    }
    alive = _alive_per_layer(traced.groups, threshold)
    for name, (module, _, _) in layers.items():
        if name not in alive:
            rows = module.weight.detach().flatten(1).float().square().sum(1)
            if module.bias is not None:
                rows = rows + module.bias.detach().float().square()
            alive[name] = (int((rows.sqrt() > threshold).sum()), False)
    pruned = _prune_traced(traced, example_inputs, threshold, verify=True)
    modules_after = dict(pruned.named_modules())
    macs_after = count_macs(pruned, example_inputs)
    report = SparsityReport(threshold, params=total_params, macs=sum(macs.values()))
    report.params_after = sum(p.numel() for p in pruned.parameters())
    report.macs_after = sum(macs_after.values())
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
            )
        )
    return report


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, _CONV) else module.out_features


def _alive_per_layer(groups: List[CoupledGroup], threshold: float) -> Dict[str, Tuple[int, bool]]:
    """Layer name -> (alive filters, True) for every layer whose out-rows are in a coupled group."""
    alive = {}
    for group, norms in zip(groups, reference.coupled_group_norms(groups)):
        for m in group.members:
            module_name, _, attr = m.name.rpartition(".")
            if attr == "weight" and m.dim == 0 and module_name not in alive:
                kept = norms[m.group] > threshold
                alive[module_name] = (int(kept.sum()), True)
    return alive
