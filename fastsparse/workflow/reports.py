"""What ``fastsparse demo`` and ``fastsparse train`` print: the demo's before/after table and
timing lines, and a trained run's pruning report."""

from __future__ import annotations

import sys
from typing import List, Optional, TextIO

import torch

from fastsparse.workflow.run import make_regularizer
from fastsparse.workflow.timing import best_fused_backend, regularizer_cost

__all__ = ["BUSY_SPREAD", "THRESHOLD_WORDS", "print_demo", "pruning_report"]

# How a threshold reads in the reports, per threshold mode.
THRESHOLD_WORDS = {
    "relative": " x its layer's largest",
    "global": " x the largest of all layers",
    "absolute": "",
}

# p80/p20 of repeated timings above which the demo says the machine was busy.
BUSY_SPREAD = 1.5


def _table(rows: List[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _regularizer_cost_lines(result, data) -> List[str]:
    """The measured regularizer cost: fused backend against the eager oracle, per step."""
    config = result.config
    device = torch.device(result.device)
    example = data.test_images[:1].to(device)
    reg = make_regularizer(
        result.model,
        example,
        config.penalty_kind,
        1.0,
        groups=config.groups,
        regularize=config.regularize,
        backend="torch",
    )
    step_without = result.train.step_seconds - result.train.regularizer_seconds

    def share(cost: float) -> str:
        return f"{1e3 * cost:.2f} ms/step = {100 * cost / (step_without + cost):.1f}% of a step"

    kwargs = dict(groups=config.groups, mode=config.mode, repeats=5, warmup=1)
    fused, reason = best_fused_backend(device)
    backends = ["torch"] if fused is None else ["torch", fused]
    # Rounds of each backend in turn (median of rounds of 5), so that both see the same load.
    calls = [
        (lambda b=b: regularizer_cost(reg.params, config.penalty_kind, backend=b, **kwargs))
        for b in backends
    ]
    costs = [[] for _ in backends]
    for _ in range(7):
        for k, call in enumerate(calls):
            costs[k].append(call())
    oracle = sorted(costs[0])[3]
    lines = [f"  eager oracle (torch):  {share(oracle)}"]
    if fused is None:
        lines.insert(0, f"  no fused {device.type.upper()} backend is available ({reason})")
    else:
        cost = sorted(costs[1])[3]
        lines.insert(
            0,
            f"  fused ({fused}):{' ' * max(1, 15 - len(fused))}{share(cost)}  "
            f"({_speedup(oracle, cost)} than the oracle)",
        )
    return lines


def _change(before: float, after: float, digits: int = 1) -> str:
    """Relative change as a signed percentage; "none" when equal."""
    if before == after:
        return "none"
    return f"{100 * (after - before) / before:+.{digits}f}%"


def _speedup(before: float, after: float) -> str:
    ratio = before / after
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _count_row(label: str, before: int, after: int, digits: int = 1) -> tuple:
    return (label, f"{before:,}", f"{after:,}", _change(before, after, digits))


def print_demo(result, data, out: Optional[TextIO] = None) -> None:
    """The before/after table and the timing lines of the demo (`result`: a `RunResult` of
    `data`), on `out` (stdout by default)."""
    out = sys.stdout if out is None else out
    config, report, stats = result.config, result.report, result.train
    acc_before, acc_after = 100 * result.accuracy_before, 100 * result.accuracy_after
    rows = [
        ("", "before", "after", "change"),
        (
            "test accuracy",
            f"{acc_before:.2f}%",
            f"{acc_after:.2f}%",
            f"{acc_after - acc_before:+.2f} points",
        ),
    ]
    for layer in report.layers:
        unit = "filters" if "Conv" in layer.type else "neurons"
        change = _change(layer.filters, layer.filters_after, 0)
        rows.append(
            (f"{unit} {layer.name} ({layer.type})", layer.filters, layer.filters_after, change)
        )
    rows.append(_count_row("parameters", report.params, report.params_after))
    rows.append(_count_row("FLOPs (multiply-adds / image)", report.macs, report.macs_after))
    rows.append(
        (
            f"inference time ({min(len(data.test_labels), 2000)} test images)",
            f"{1e3 * result.inference_before:.1f} ms",
            f"{1e3 * result.inference_after:.1f} ms",
            _speedup(result.inference_before, result.inference_after),
        )
    )
    relative = THRESHOLD_WORDS[config.threshold_mode]
    print(
        f"\nthreshold: filters with l2 norm <= {config.threshold:g}{relative} are removed with "
        "their coupled slices (bias, BatchNorm, next layer's inputs)",
        file=out,
    )
    print(_table(rows), file=out)
    print(
        f"\ntraining: {stats.seconds:.1f} s, {1e3 * stats.step_seconds:.1f} ms per step; the "
        f"regularizer ({stats.backend} backend, {config.mode} path) took "
        f"{1e3 * stats.regularizer_seconds:.2f} ms of it ({100 * stats.regularizer_share:.1f}%)",
        file=out,
    )
    print("regularizer cost per training step, fused backend vs eager oracle:", file=out)
    for line in _regularizer_cost_lines(result, data):
        print(line, file=out)
    if result.timing_spread > BUSY_SPREAD:
        print(
            f"note: repeated timings varied by {100 * (result.timing_spread - 1):.0f}% "
            "(p80 vs p20): the machine was busy while this ran, so the times above are "
            "inflated; the before/after ratios were measured in turn and hold better",
            file=out,
        )


def pruning_report(result) -> str:
    """What a trained run's thresholding removed (`result`: a `RunResult`): the rule, then the
    per-layer sparsity report."""
    config = result.config
    relative = THRESHOLD_WORDS[config.threshold_mode]
    score = {
        "filter_norm": "l2 norm",
        "bn_scale": "BatchNorm |scale|",
        "group_norm": "coupled-group l2 norm",
    }[config.prune_criterion]
    return (
        f"every filter with {score} <= {config.threshold:g}{relative} was zeroed with its "
        f"coupled slices, then the zero groups were removed:\n{result.report.format()}"
    )
