"""The trade-off study: accuracy against filters (and FLOPs) removed, penalty by penalty.

The methods of :mod:`fastsparse.methods` (OICSR, feature flow, selective weight decay, network
slimming) take part like the penalty kinds (``kinds=["group_lasso", "slimming"]``); each is
thresholded by its own rule (slimming: BatchNorm scales; OICSR: the norm of the whole out-in
channel group; the others: filter norms).

For every penalty kind and strength, :func:`run_study` trains the model from the same seed (same
initialization, same batch order), then thresholds and prunes it at every threshold of the sweep
(pruning needs no retraining: it is cheap), and records one row per (kind, strength, threshold).
An unregularized run (kind ``"none"``) gives the baseline accuracy and shows how much plain
magnitude thresholding removes on its own.

Outputs, in the output directory:

- ``results.csv``: one row per (kind, strength, threshold), rewritten after every training run
  (an interrupted study keeps what it measured);
- ``tradeoff.png``: test accuracy after pruning against the share of conv filters removed and
  against the share of FLOPs removed, one colour per kind, with each kind's Pareto front;
- ``results.md``: per kind, the most filters and FLOPs removed within 0.5 and 1 point of the
  baseline accuracy, then every row;
- ``command.txt``: the command, versions, machine and wall time.

Example::

    >>> from fastsparse.workflow.study import run_study
    >>> rows = run_study("out", kinds=["l1", "group_l1l2"], epochs=1)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch

from fastsparse.core.contract import KINDS
from fastsparse.methods import METHODS
from fastsparse.pruning.threshold import threshold_and_prune
from fastsparse.workflow.config import RunConfig
from fastsparse.workflow.loop import evaluate
from fastsparse.workflow.run import check_method, load_data, run
from fastsparse.workflow.timing import measure_inference

__all__ = [
    "read_rows",
    "STUDY_EPOCHS",
    "STUDY_STRENGTHS",
    "STUDY_THRESHOLDS",
    "run_study",
    "summarize",
    "write_outputs",
]

# Strengths swept per kind (LeNet-5, bundled MNIST subset, 10 epochs), half a decade apart, from
# about no effect to a clear accuracy loss. The penalties' gradients differ in scale by orders of
# magnitude (l1: 1 per weight; group lasso: 1 per filter; Hoyer-square: ~2·sqrt(filter size)/norm
# per weight...), hence one grid per kind.
STUDY_STRENGTHS: Dict[str, tuple] = {
    "l1": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "l2": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "group_lasso": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "l1l2": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "group_l1l2": (3e-2, 1e-1, 3e-1, 1.0, 3.0),
    "hoyer_square": (3e-6, 1e-5, 3e-5, 1e-4, 3e-4),
    "group_hoyer_square": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "sparse_group_lasso": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    # the methods of fastsparse.methods (a decade apart: their scales are less known)
    "oicsr": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "feature_flow": (1e-3, 1e-2, 1e-1, 1.0),
    "selective_decay": (1e-3, 1e-2, 1e-1, 1.0),
    "slimming": (1e-4, 1e-3, 1e-2, 3e-2),
}

# Relative thresholds: a filter goes when its norm is <= t x the largest norm of its layer.
STUDY_THRESHOLDS = (0.01, 0.05, 0.1, 0.2, 0.3)

# Training epochs of every run of the default study.
STUDY_EPOCHS = 10

# Accuracy tolerances (points below the baseline) of the summary table.
TOLERANCES = (0.5, 1.0)


def _rows_for_thresholds(result, data, thresholds, inference_repeats) -> List[dict]:
    """Re-threshold a trained model at each threshold: one summary row each."""
    example = data.test_images[:1].to(next(result.model.parameters()).device)
    rows = []
    for t in thresholds:
        if t == result.config.threshold:
            rows.append(result.summary())
            continue
        pruned = threshold_and_prune(
            result.model,
            example,
            t,
            result.config.threshold_mode,
            result.config.prune_criterion,
        )
        variant = dataclasses.replace(
            result,
            config=dataclasses.replace(result.config, threshold=t),
            pruned=pruned.pruned,
            prune=pruned,
            accuracy_after=evaluate(pruned.pruned, data.test_images, data.test_labels),
            inference_after=measure_inference(
                pruned.pruned, data.test_images[:2000], repeats=inference_repeats
            ),
        )
        rows.append(variant.summary())
    return rows


def run_study(
    out_dir,
    *,
    kinds: Sequence[str] = KINDS,
    strengths: Optional[Dict[str, Sequence[float]]] = None,
    thresholds: Sequence[float] = STUDY_THRESHOLDS,
    epochs: int = STUDY_EPOCHS,
    base: Optional[RunConfig] = None,
    baseline: bool = True,
    method_options: Optional[Dict[str, dict]] = None,
    command: str = "",
    progress: bool = True,
    stream: Optional[TextIO] = None,
    log: Callable[[str], None] = print,
    inference_repeats: int = 5,
    resume: bool = False,
) -> List[dict]:
    """Train, threshold and prune once per (kind, strength); write the outputs; return the rows.

    Args:
        out_dir: where the CSV, plot, table and command file go (created).
        kinds: penalty kinds and methods (:data:`fastsparse.methods.METHODS`) to sweep. A
            method's filters are thresholded by its own rule (``RunConfig.prune_criterion``);
            ``base.method_options`` go to every method of the sweep.
        strengths: kind -> strengths; kinds missing from it use :data:`STUDY_STRENGTHS`.
        thresholds: relative (or, with ``base.threshold_mode == "absolute"``, absolute)
            thresholds applied to every trained model.
        epochs: training epochs of every run.
        base: settings shared by all runs (model, data set, lr, seed, backend...).
        baseline: also train without a regularizer (kind ``"none"``).
        method_options: method -> its options (``build_method``'s keyword arguments), on top
            of ``base.method_options``.
        command: the command line, recorded in ``command.txt``.
        progress, stream: per-epoch progress bars.
        log: where one line per finished run goes.
        inference_repeats: timing repetitions of each inference measurement.
        resume: keep the rows of an earlier ``results.csv`` in `out_dir` and skip the
            (kind, strength) runs it already holds (to extend a sweep, or finish one that
            was interrupted); the runs are seeded, so the numbers match a fresh sweep's.
    """
    strengths = dict(strengths or {})
    base = dataclasses.replace(base or RunConfig(), epochs=epochs, threshold=thresholds[0])
    unknown = [k for k in kinds if k not in KINDS + METHODS]
    if unknown:
        raise ValueError(
            f"unknown kind(s) {', '.join(unknown)}; valid kinds: {', '.join(KINDS)}; "
            f"methods: {', '.join(METHODS)}"
        )
    plan = [("none", 0.0)] if baseline else []
    for kind in kinds:
        plan += [(kind, float(s)) for s in strengths.get(kind, STUDY_STRENGTHS[kind])]

    extra_options = dict(method_options or {})
    unknown = [k for k in extra_options if k not in METHODS]
    if unknown:
        raise ValueError(f"method_options for unknown method(s) {', '.join(unknown)}")

    def config_of(kind: str, s: Optional[float]) -> RunConfig:
        return dataclasses.replace(
            base,
            kind=kind,
            strength=s if kind != "none" else None,
            method_options={**base.method_options, **extra_options.get(kind, {})}
            if kind in METHODS
            else {},
        )

    for kind, s in plan:  # fail on any bad setting before the first run
        config_of(kind, s).validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = "\n".join(
        [
            f"run settings: {base.to_dict()}",
            f"thresholds: {list(thresholds)}",
            "runs (kind strength):",
        ]
        + [f"  {kind} {s:g}" for kind, s in plan]
    )
    data = load_data(base)
    for kind in dict.fromkeys(k for k, _ in plan):  # a method that cannot apply fails now
        check_method(config_of(kind, None), data)
    rows: List[dict] = read_rows(out / "results.csv") if resume else []
    done = {(r["kind"], float(r["strength"])) for r in rows}
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, (kind, s) in enumerate(plan):
        if (kind, s) in done:
            continue
        config = config_of(kind, s)
        result = run(
            config,
            data=data,
            progress=progress,
            stream=stream,
            inference_repeats=inference_repeats,
        )
        new = _rows_for_thresholds(result, data, thresholds, inference_repeats)
        rows += new
        acceptable = [r for r in new if r["accuracy_after"] >= r["accuracy_before"] - 1.0]
        best = max(acceptable or new, key=lambda r: r["conv_filters_removed_pct"])
        log(
            f"[{i + 1}/{len(plan)}] {kind} strength {s:g}: "
            f"accuracy {best['accuracy_before']:.2f}%; at threshold {best['threshold']:g}: "
            f"{best['accuracy_after']:.2f}%, {best['conv_filters_removed_pct']:.0f}% conv "
            f"filters and {best['flops_removed_pct']:.0f}% FLOPs removed "
            f"({result.train.seconds:.0f} s)"
        )
        write_outputs(
            out,
            rows,
            command=command,
            seconds=time.perf_counter() - start,
            cpu_seconds=time.process_time() - cpu_start,
            settings=settings,
        )
    return rows


def read_rows(path: Path) -> List[dict]:
    """The rows of a results.csv (numbers as int/float), or [] if there is none."""
    if not Path(path).is_file():
        return []

    def value(text: str):
        for convert in (int, float):
            try:
                return convert(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- outputs


def _baseline_accuracy(rows: List[dict]) -> float:
    none = [r["accuracy_before"] for r in rows if r["kind"] == "none"]
    return none[0] if none else max(r["accuracy_before"] for r in rows)


def summarize(rows: List[dict], tolerance: float) -> List[dict]:
    """Per kind, the row removing the most conv filters (ties: FLOPs) within `tolerance`.

    Only rows whose accuracy after pruning is >= baseline - tolerance (points) count; a kind
    with no such row gets a row of ``None``.
    """
    floor = _baseline_accuracy(rows) - tolerance
    best = {}
    for r in rows:
        if r["accuracy_after"] < floor:
            continue
        key = (r["conv_filters_removed_pct"], r["flops_removed_pct"], r["accuracy_after"])
        old = best.get(r["kind"])
        if old is None or key > (
            old["conv_filters_removed_pct"],
            old["flops_removed_pct"],
            old["accuracy_after"],
        ):
            best[r["kind"]] = r
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    return [best.get(k, {"kind": k}) for k in kinds]


def _markdown(rows: List[dict], command: str) -> str:
    baseline = _baseline_accuracy(rows)
    lines = [
        "# Trade-off study: accuracy vs filters removed",
        "",
        f"Command: `{command}`" if command else "",
        "",
        f"Baseline test accuracy (no regularizer, unpruned): **{baseline:.2f}%**. Accuracies are "
        "measured on the test split after thresholding and pruning, without any fine-tuning.",
        "",
    ]
    layer_keys = [k for k in rows[0] if k.startswith("kept[")]
    for tol in TOLERANCES:
        lines += [
            f"## Most removed within {tol:g} point(s) of the baseline accuracy",
            "",
            "| kind | strength | threshold | accuracy | conv filters removed | FLOPs removed | "
            "params removed | " + " | ".join(k[5:-1] for k in layer_keys) + " |",
            "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(layer_keys),
        ]
        for r in summarize(rows, tol):
            if "strength" not in r:
                lines.append(f"| {r['kind']} | — | — | — | — | — | — |" + " — |" * len(layer_keys))
                continue
            lines.append(
                f"| {r['kind']} | {r['strength']:g} | {r['threshold']:g} | "
                f"{r['accuracy_after']:.2f}% | {r['conv_filters_removed_pct']:.1f}% | "
                f"{r['flops_removed_pct']:.1f}% | {r['params_removed_pct']:.1f}% | "
                + " | ".join(str(r[k]) for k in layer_keys)
                + " |"
            )
        lines.append("")
    lines += [
        "## All runs",
        "",
        "| kind | strength | threshold | accuracy before | accuracy after | conv filters removed | "
        "FLOPs removed | params removed | "
        + " | ".join(k[5:-1] for k in layer_keys)
        + " | regularizer share of a step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(layer_keys) + "---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['strength']:g} | {r['threshold']:g} | "
            f"{r['accuracy_before']:.2f}% | {r['accuracy_after']:.2f}% | "
            f"{r['conv_filters_removed_pct']:.1f}% | {r['flops_removed_pct']:.1f}% | "
            f"{r['params_removed_pct']:.1f}% | "
            + " | ".join(str(r[k]) for k in layer_keys)
            + f" | {r['regularizer_share_pct']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def _pareto(points: List[tuple]) -> List[tuple]:
    """The (x, y) points not dominated by one with larger-or-equal x and y, sorted by x."""
    front = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def _plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = _baseline_accuracy(rows)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    markers = "os^vDPX*<>"
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    for ax, key, label in (
        (axes[0], "conv_filters_removed_pct", "conv filters removed (%)"),
        (axes[1], "flops_removed_pct", "FLOPs (multiply-adds) removed (%)"),
    ):
        for i, kind in enumerate(kinds):
            points = [(r[key], r["accuracy_after"]) for r in rows if r["kind"] == kind]
            color = "black" if kind == "none" else f"C{i % 10}"
            ax.scatter(*zip(*points), s=14, alpha=0.35, color=color, marker=markers[i % 10])
            front = _pareto(points)
            ax.plot(*zip(*front), marker=markers[i % 10], color=color, label=kind, lw=1.5)
        ax.axhline(baseline, color="gray", ls="--", lw=1)
        ax.axhline(baseline - 1.0, color="gray", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.set_xlim(-2, 100)
        ax.grid(alpha=0.3)
    low = min(r["accuracy_after"] for r in rows)
    axes[0].set_ylim(max(low - 1, baseline - 10), min(100, baseline + 1.5))
    axes[0].set_ylabel("test accuracy after pruning (%)")
    axes[1].legend(title="penalty (Pareto front)", fontsize=8, loc="lower left")
    fig.suptitle(title + f"  (dashed: baseline {baseline:.2f}%, dotted: baseline - 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(
    out: Path,
    rows: List[dict],
    *,
    command: str = "",
    seconds: float = 0.0,
    cpu_seconds: float = 0.0,
    settings: str = "",
):
    """Write results.csv, results.md, tradeoff.png (with matplotlib) and command.txt into `out`."""
    if not rows:
        return
    out = Path(out)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(_markdown(rows, command))
    if importlib.util.find_spec("matplotlib") is None:
        print(
            f"fastsparse study: matplotlib is not installed, so no {out / 'tradeoff.png'} "
            "(pip install matplotlib); the CSV and the tables are written",
            file=sys.stderr,
        )
    else:
        _plot(rows, out / "tradeoff.png", "fastsparse study")
    info = [
        command or "(called from Python)",
        "",
        f"this invocation: {seconds / 60:.1f} min wall time, {cpu_seconds / 60:.1f} min CPU time "
        f"(all threads); {len(rows)} rows in results.csv",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.machine()} {platform.processor() or ''}".rstrip(),
        f"torch threads: {torch.get_num_threads()}, cuda: {torch.cuda.is_available()}",
        f"finished: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    if settings:
        info += ["", settings]
    (out / "command.txt").write_text("\n".join(info) + "\n")
