"""Reports of a run: the cumulative CSV, the markdown tables, the PNG plots, the console summary.

Everything here reads the run dict that benchmarks.run builds (the same content as the JSON), so
a report can be redrawn from a saved JSON:

    python -m benchmarks.report benchmarks/results/cpu-2026-01-01.json
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

CSV_COLUMNS = [
    "started",
    "device_type",
    "device_name",
    "threads",
    "load_before",
    "load_after",
    "torch",
    "triton",
    "fastsparse",
    "python",
    "git_commit",
    "git_dirty",
    "profile",
    "kind",
    "groups",
    "workload",
    "mode",
    "provider",
    "role",
    "status",
    "reason",
    "bytes",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "gbps",
    "pct_copy",
    "copy_gbps",
    "peak_extra_bytes",
    "check",
    "first_call_s",
    "repeats",
    "raw_ms",
]


def _ok(run: dict) -> List[dict]:
    return [r for r in run["results"] if r["status"] == "ok"]


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


# --------------------------------------------------------------------------- metrics


def add_derived_metrics(run: dict, pct_copy: bool = True) -> None:
    """% of copy bandwidth for every ok row; speedups of fastsparse rows vs every baseline."""
    by_case: Dict[tuple, List[dict]] = {}
    for row in _ok(run):
        if pct_copy:
            row["pct_copy"] = 100.0 * row["gbps"] / run["copy"]["gbps"]
        by_case.setdefault((row["workload"], row["mode"]), []).append(row)
    for rows in by_case.values():
        baselines = [r for r in rows if r["role"] == "baseline"]
        for row in rows:
            if row["role"] == "fastsparse":
                row["speedup"] = {
                    b["provider"]: b["median_ms"] / row["median_ms"] for b in baselines
                }
        _add_step_costs(rows, baselines)


# The plain optimizer step that the prox_step mode's sparse steps are measured over.
BASE_STEP = "plain-step"


def _add_step_costs(rows: List[dict], baselines: List[dict]) -> None:
    """prox_step rows: the cost over the plain step (over_base_ms) and, for fastsparse rows,
    each baseline's cost over fastsparse's (over_base_ratio)."""
    base = next((r for r in rows if r["provider"] == BASE_STEP and r["mode"] == "prox_step"), None)
    if base is None:
        return
    for row in rows:
        if row is not base:
            row["over_base_ms"] = row["median_ms"] - base["median_ms"]
    for row in rows:
        if row["role"] == "fastsparse" and row["over_base_ms"] > 0:
            row["over_base_ratio"] = {
                b["provider"]: b["over_base_ms"] / row["over_base_ms"] for b in baselines
            }


def merge(runs: List[dict]) -> dict:
    """One run from parts measured on the same device with the same penalty (a split run).

    Later parts win where two measured the same workload, mode and provider. Every row keeps
    the % of copy bandwidth of its own part (each part measured the copy); speedups are
    recomputed across parts. The first part's copy measurement is the run's; all are listed.
    """
    first = runs[0]
    for other in runs[1:]:
        for key in ("kind", "groups", "strength"):
            if other["config"][key] != first["config"][key]:
                raise ValueError(f"cannot merge runs with different {key}")
        if other["device"]["name"] != first["device"]["name"]:
            raise ValueError("cannot merge runs of different devices")
    merged = json.loads(json.dumps(first))
    rows, workloads = {}, {}
    for run in runs:
        for w in run["workloads"]:
            workloads.setdefault(w["label"], w)
        for r in run["results"]:
            key = (r["workload"], r["mode"], r["provider"])
            if r["status"] == "ok" or key not in rows or rows[key]["status"] != "ok":
                rows[key] = r
        merged["modes"].update(run["modes"])
        merged["providers"].update(run["providers"])
    order = {name: i for i, name in enumerate(merged["providers"])}
    merged["workloads"] = list(workloads.values())
    merged["results"] = sorted(rows.values(), key=lambda r: order.get(r["provider"], 0))
    merged["finished"] = max(r.get("finished") or "" for r in runs) or None
    merged["complete"] = all(r.get("complete") for r in runs)
    merged["copy_parts"] = [r["copy"]["gbps"] for r in runs]
    merged["config"]["argv"] = [r["config"]["argv"] for r in runs]
    merged["load_after"] = runs[-1].get("load_after")
    add_derived_metrics(merged, pct_copy=False)
    return merged


# --------------------------------------------------------------------------- CSV


def append_csv(run: dict, path: Path) -> Path:
    """Append one row per result to the CSV (header written when the file is new).

    A file whose header differs from CSV_COLUMNS is left alone; the rows then go to a file named
    after the schema (results.v<schema>.csv) so that no row lands under the wrong header.
    """
    path = Path(path)
    if path.exists():
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != CSV_COLUMNS:
            path = path.with_name(f"{path.stem}.v{run['schema']}{path.suffix}")
    new = not path.exists()
    device, versions, config = run["device"], run["versions"], run["config"]
    common = {
        "started": run["started"],
        "device_type": device["type"],
        "device_name": device["name"],
        "threads": device.get("threads"),
        "load_before": (device.get("load_before") or [None])[0],
        "load_after": (run.get("load_after") or [None])[0],
        "torch": versions["torch"],
        "triton": versions["triton"],
        "fastsparse": versions["fastsparse"],
        "python": versions["python"],
        "git_commit": run["git"]["commit"],
        "git_dirty": run["git"]["dirty"],
        "profile": config["profile"],
        "kind": config["kind"],
        "groups": config["groups"],
        "copy_gbps": f"{run['copy']['gbps']:.4g}",
    }
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for r in run["results"]:
            writer.writerow(
                {
                    **common,
                    **{k: r.get(k) for k in ("workload", "mode", "provider", "role", "status")},
                    "reason": r.get("reason") or "",
                    "bytes": r.get("bytes"),
                    "median_ms": _num(r.get("median_ms")),
                    "p20_ms": _num(r.get("p20_ms")),
                    "p80_ms": _num(r.get("p80_ms")),
                    "gbps": _num(r.get("gbps")),
                    "pct_copy": _num(r.get("pct_copy")),
                    "peak_extra_bytes": r.get("peak_extra_bytes"),
                    "check": (r.get("check") or {}).get("status", ""),
                    "first_call_s": _num(r.get("first_call_s")),
                    "repeats": r.get("repeats"),
                    "raw_ms": " ".join(f"{t:.6g}" for t in r.get("raw_ms", [])),
                }
            )
    return path


def _num(x) -> str:
    return "" if x is None else f"{x:.6g}"


# --------------------------------------------------------------------------- targets


def _row(run, workload, mode, provider) -> Optional[dict]:
    for r in _ok(run):
        if (r["workload"], r["mode"], r["provider"]) == (workload, mode, provider):
            return r
    return None


def _labels(run, name: str) -> List[str]:
    return [w["label"] for w in run["workloads"] if w["name"].split(" ")[0] == name]


def targets(run: dict) -> List[dict]:
    """The performance targets for this device, each with the measured figure and met / not met.

    CUDA: bandwidth, whole-model speedups and memory of the fused kernels; CPU: the native
    in-place path against eager, torch.compile and a copy.
    """
    fused = [p for p, v in run["providers"].items() if v["role"] == "fastsparse"]
    out = []

    def speedup_target(provider, name, baseline, factor, what):
        labels = _labels(run, name)
        if not labels:
            out.append({"target": what, "provider": provider, "status": "not measured"})
            return
        for label in labels:
            fast = _row(run, label, "inplace", provider)
            bases = [_row(run, label, "inplace", b) for b in baseline]
            bases = [b for b in bases if b]
            if not fast or not bases:
                out.append(
                    {
                        "target": what,
                        "provider": provider,
                        "workload": label,
                        "status": "not measured",
                    }
                )
                continue
            best = min(bases, key=lambda b: b["median_ms"])
            x = best["median_ms"] / fast["median_ms"]
            out.append(
                {
                    "target": what,
                    "provider": provider,
                    "workload": label,
                    "measured": f"{x:.2f}x vs {best['provider']}",
                    "status": "met" if x >= factor else "not met",
                }
            )

    step_provider = "fastsparse-triton" if run["device"]["type"] == "cuda" else "fastsparse-native"
    for name in ("resnet50", "llama7b"):
        for provider in (step_provider, "fastsparse-native-unfused"):
            if provider in run["providers"]:
                _step_cost_target(run, provider, name, out)
    if run["device"]["type"] == "cuda":
        compiled = ["compile-default", "compile-max-autotune"]
        for p in fused:
            for mode in ("value_grad", "inplace"):
                rows = [
                    _row(run, w["label"], mode, p)
                    for w in run["workloads"]
                    if w["family"] == "tensor" and w["weight_bytes"] >= 64e6
                ]
                rows = [r for r in rows if r]
                what = f"{mode} on tensors >= 64 MB: >= 85% of copy bandwidth"
                if not rows:
                    out.append({"target": what, "provider": p, "status": "not measured"})
                    continue
                worst = min(rows, key=lambda r: r["pct_copy"])
                out.append(
                    {
                        "target": what,
                        "provider": p,
                        "workload": worst["workload"],
                        "measured": f"{worst['pct_copy']:.0f}% (lowest)",
                        "status": "met" if worst["pct_copy"] >= 85 else "not met",
                    }
                )
            for name in ("resnet50", "vgg16"):
                speedup_target(p, name, ["eager-oracle"], 10, "whole-model inplace >= 10x eager")
                speedup_target(p, name, compiled, 3, "whole-model inplace >= 3x torch.compile")
                speedup_target(p, name, ["handwritten"], 2, "whole-model inplace >= 2x handwritten")
            speedup_target(p, "llama7b", ["eager-oracle"], 5, "Llama stack inplace >= 5x eager")
            _memory_target(run, p, out)
    else:
        for name in ("vgg16", "resnet50"):
            p = "fastsparse-native"
            speedup_target(p, name, ["eager-oracle"], 5, "CPU inplace >= 5x eager")
            speedup_target(p, name, ["compile-default"], 1.5, "CPU inplace >= 1.5x torch.compile")
            for label in _labels(run, name):
                fast = _row(run, label, "inplace", p)
                copy = _row(run, label, "inplace", "copy")
                what = "CPU inplace within 2x of a copy W -> grad"
                if not fast or not copy:
                    out.append(
                        {"target": what, "provider": p, "workload": label, "status": "not measured"}
                    )
                    continue
                x = fast["median_ms"] / copy["median_ms"]
                out.append(
                    {
                        "target": what,
                        "provider": p,
                        "workload": label,
                        "measured": f"{x:.2f}x the copy time",
                        "status": "met" if x <= 2 else "not met",
                    }
                )
    return out


def _step_cost_target(run: dict, provider: str, name: str, out: list) -> None:
    """The sparse optimizer step's cost over the plain step: at least 5x below torchao PAT's."""
    what = "prox_step cost over the plain step >= 5x below torchao PAT's"
    rows = [
        (
            label,
            _row(run, label, "prox_step", provider),
            _row(run, label, "prox_step", "torchao-pat"),
        )
        for label in _labels(run, name)
    ]
    rows = [(label, fast, pat) for label, fast, pat in rows if fast and pat]
    if not rows:
        if "prox_step" in run["modes"]:
            out.append(
                {"target": what, "provider": provider, "workload": name, "status": "not measured"}
            )
        return
    for label, fast, pat in rows:
        cost, theirs = fast["over_base_ms"], pat["over_base_ms"]
        if cost <= 0:  # the sparse step is cheaper than the plain step: better than free
            measured = f"{-cost:.2f} ms below the plain step; PAT adds {theirs:.2f} ms"
            met = theirs > 0
        else:
            x = theirs / cost
            measured = f"{x:.2f}x ({theirs:.2f} ms vs {cost:.2f} ms over the step)"
            met = x >= 5
        out.append(
            {
                "target": what,
                "provider": provider,
                "workload": label,
                "measured": measured,
                "status": "met" if met else "not met",
            }
        )
        base = _row(run, label, "prox_step", BASE_STEP)
        ratio = fast["median_ms"] / base["median_ms"]
        out.append(
            {
                "target": "whole sparse step <= 1.3x torch's foreach step of the optimizer",
                "provider": provider,
                "workload": label,
                "measured": f"{ratio:.2f}x",
                "status": "met" if ratio <= 1.3 else "not met",
            }
        )


def _memory_target(run: dict, provider: str, out: list) -> None:
    """Peak extra memory of the in-place path: O(groups), i.e. <= 64 B/group + 1 MiB."""
    what = "inplace peak extra memory O(groups) (<= 64 B/group + 1 MiB)"
    groups = {w["label"]: w for w in run["workloads"]}
    rows = [r for r in _ok(run) if r["mode"] == "inplace" and r["provider"] == provider]
    rows = [r for r in rows if r.get("peak_extra_bytes") is not None]
    if not rows:
        out.append({"target": what, "provider": provider, "status": "not measured"})
        return
    worst = max(rows, key=lambda r: r["peak_extra_bytes"] / max(groups[r["workload"]]["numel"], 1))
    limit = 64 * run_groups(run, worst["workload"]) + 2**20
    out.append(
        {
            "target": what,
            "provider": provider,
            "workload": worst["workload"],
            "measured": f"{worst['peak_extra_bytes'] / 2**20:.2f} MiB",
            "status": "met" if worst["peak_extra_bytes"] <= limit else "not met",
        }
    )


def run_groups(run: dict, label: str) -> int:
    """Number of groups of a workload under the run's grouping (stored per workload)."""
    for w in run["workloads"]:
        if w["label"] == label:
            return w.get("groups") or w["numel"]
    return 0


# --------------------------------------------------------------------------- markdown


def _mb(nbytes) -> str:
    return "" if nbytes is None else f"{nbytes / 1e6:.3g}"


def markdown(run: dict) -> str:
    """The run as markdown: context, targets, one section per mode, skipped providers."""
    d, v, c, g = run["device"], run["versions"], run["config"], run["git"]
    copy = run["copy"]
    dirty = " (uncommitted changes)" if g.get("dirty") else ""
    lines = [
        f"# fastsparse benchmarks: {d['name']}, {run['date']}",
        "",
        f"- Device: {d['type']} {d['name']}, {d.get('threads')} threads"
        + (f", capability {d['capability']}, CUDA {d['cuda']}" if d["type"] == "cuda" else "")
        + f"; load average (1, 5, 15 min) before {d.get('load_before')}, "
        f"after {run.get('load_after')}",
        f"- Versions: torch {v['torch']}, triton {v['triton']}, fastsparse {v['fastsparse']}, "
        f"torch-pruning {v['torch_pruning']}, python {v['python']}",
        f"- Commit: {g['commit']}{dirty}; started {run['started']}, "
        + (f"finished {run['finished']}" if run.get("complete") else "**not finished (partial)**"),
        f"- Penalty: kind `{c['kind']}`, groups `{c['groups']}`, strength {c['strength']}; "
        f"profile `{c['profile']}`",
        f"- Device-to-device copy: **{copy['gbps']:.1f} GB/s** (median of "
        f"{len(copy['raw_ms'])} copies of {copy['buffer_bytes'] >> 20} MiB); "
        "`% copy` = effective GB/s / this",
        f"- Timing: {c['settings']}; median, p20 and p80 of the repeats in the JSON",
        "",
    ]
    lines += _busy_warning(run)
    lines += _targets_section(run)
    for mode, info in run["modes"].items():
        lines += _mode_section(run, mode, info)
    lines += _skipped_section(run)
    if run.get("files"):
        lines += ["## Files", ""]
        lines += [f"- {k}: `{name}`" for k, name in run["files"].items()]
        lines.append("")
    if run.get("plots_error"):
        lines += [f"Plots were not drawn: {run['plots_error']}", ""]
    return "\n".join(lines)


def _busy_warning(run: dict) -> List[str]:
    """A warning when other processes competed for the CPU cores during the run.

    Their load is estimated from the 1-minute load averages sampled before, during and after
    the run, minus the harness's own threads (which count in the samples taken while it runs).
    """
    d = run["device"]
    if d["type"] != "cpu":
        return []
    cores = d.get("cpu_count") or 1
    threads = d.get("threads") or 1
    during = list(run.get("load_samples") or []) + [(run.get("load_after") or [0.0])[0]]
    others = max([(d.get("load_before") or [0.0])[0]] + [x - threads for x in during])
    if others <= 0.5 * cores:
        return []
    return [
        f"**Warning: the machine was busy** (other processes' load estimated at {others:.1f} on "
        f"{cores} cores from the load averages). Parallel CPU code (PyTorch ops, inductor "
        "kernels, native OpenMP kernels) then waits for descheduled threads, so times are "
        "inflated, often to multiples of the scheduler's time slice, and the more parallel "
        "regions an implementation runs, the more it loses. Compare these numbers with care, "
        "or rerun on a quiet machine.",
        "",
    ]


def _targets_section(run: dict) -> List[str]:
    rows = targets(run)
    if not rows:
        return []
    out = [
        "## Targets",
        "",
        "| target | provider | workload | measured | status |",
        "|---|---|---|---|---|",
    ]
    for t in rows:
        out.append(
            f"| {t['target']} | {t['provider']} | {t.get('workload', '')} | "
            f"{t.get('measured', '')} | {t['status']} |"
        )
    return out + [""]


def _providers_with_rows(run: dict, mode: str) -> List[str]:
    names = []
    for r in _ok(run):
        if r["mode"] == mode and r["provider"] not in names:
            names.append(r["provider"])
    order = list(run["providers"])
    return sorted(names, key=order.index)


def _mode_section(run: dict, mode: str, info: dict) -> List[str]:
    providers = _providers_with_rows(run, mode)
    out = [f"## {mode}: {info['description']}", "", f"Minimal bytes: {info['bytes']}.", ""]
    if not providers:
        return out + ["No provider ran in this mode.", ""]
    baselines = [p for p in providers if run["providers"][p]["role"] == "baseline"]
    fused = [p for p in providers if run["providers"][p]["role"] == "fastsparse"]
    out += ["Median time (ms):", ""]
    out += ["| workload | MB moved | " + " | ".join(providers) + " |"]
    out += ["|---|---:|" + "---:|" * len(providers)]
    workloads = [w["label"] for w in run["workloads"]]
    for label in workloads:
        cells = [_row(run, label, mode, p) for p in providers]
        if not any(cells):
            continue
        size = next(r["bytes"] for r in cells if r)
        out.append(
            f"| {label} | {_mb(size)} | "
            + " | ".join(_fmt(r["median_ms"]) if r else "—" for r in cells)
            + " |"
        )
    out += ["", "Effective bandwidth (GB/s, % of copy) and peak extra memory (MB):", ""]
    out += ["| workload | " + " | ".join(providers) + " |"]
    out += ["|---|" + "---:|" * len(providers)]
    for label in workloads:
        cells = [_row(run, label, mode, p) for p in providers]
        if not any(cells):
            continue
        text = []
        for r in cells:
            if not r:
                text.append("—")
                continue
            peak = r.get("peak_extra_bytes")
            peak = "n/a" if peak is None else _mb(peak)
            text.append(f"{_fmt(r['gbps'])} ({r['pct_copy']:.0f}%), {peak}")
        out.append(f"| {label} | " + " | ".join(text) + " |")
    if fused and baselines:
        out += ["", "Speedup of fastsparse (baseline time / fastsparse time; check = oracle):", ""]
        out += [
            "| workload | provider | check | " + " | ".join(f"vs {b}" for b in baselines) + " |"
        ]
        out += ["|---|---|---|" + "---:|" * len(baselines)]
        for label in workloads:
            for p in fused:
                r = _row(run, label, mode, p)
                if not r:
                    continue
                check = r.get("check") or {}
                status = check.get("status", "")
                if check.get("max_rel_err") is not None:
                    status += f" ({check['max_rel_err']:.1e})"
                speed = [r.get("speedup", {}).get(b) for b in baselines]
                out.append(
                    f"| {label} | {p} | {status} | "
                    + " | ".join(f"{_fmt(x)}x" if x else "—" for x in speed)
                    + " |"
                )
    if mode == "prox_step":
        out += _step_cost_table(run, providers, workloads)
    mismatches = [
        r
        for r in _ok(run)
        if r["mode"] == mode and (r.get("check") or {}).get("status") == "mismatch"
    ]
    if mismatches:
        out += [
            "",
            "**Results that differ from the oracle:** "
            + ", ".join(
                f"{r['provider']} on {r['workload']} ({r['check'].get('max_rel_err')})"
                for r in mismatches
            ),
        ]
    return out + [""]


def _step_cost_table(run: dict, providers: List[str], workloads: List[str]) -> List[str]:
    """Cost of each sparse step over the plain step, and the baselines' over fastsparse's."""
    others = [p for p in providers if p != BASE_STEP]
    out = ["", f"Cost over the plain step ({BASE_STEP}), ms; ratio = baseline / fastsparse:", ""]
    out += ["| workload | " + " | ".join(others) + " |", "|---|" + "---:|" * len(others)]
    for label in workloads:
        cells = [_row(run, label, "prox_step", p) for p in others]
        if not any(c and "over_base_ms" in c for c in cells):
            continue
        text = []
        for r in cells:
            if not r or "over_base_ms" not in r:
                text.append("—")
                continue
            cell = _fmt(r["over_base_ms"])
            ratios = r.get("over_base_ratio")
            if ratios:
                cell += " (" + ", ".join(f"{b}: {_fmt(x)}x" for b, x in ratios.items()) + ")"
            text.append(cell)
        out.append(f"| {label} | " + " | ".join(text) + " |")
    return out


def _skipped_section(run: dict) -> List[str]:
    groups: Dict[tuple, List[str]] = {}
    for r in run["results"]:
        if r["status"] != "ok":
            key = (r["provider"], r["status"], r["reason"])
            groups.setdefault(key, [])
            if r["workload"] not in groups[key]:
                groups[key].append(r["workload"])
    if not groups:
        return []
    out = [
        "## Skipped and failed",
        "",
        "| provider | status | reason | workloads |",
        "|---|---|---|---|",
    ]
    for (provider, status, reason), labels in groups.items():
        where = "all" if len(labels) == len(run["workloads"]) else ", ".join(labels)
        reason = (reason or "").replace("|", "/")
        out.append(f"| {provider} | {status} | {reason} | {where} |")
    return out + [""]


# --------------------------------------------------------------------------- plots


def write_plots(run: dict, out_dir: Path, stem: str) -> Dict[str, Path]:
    """Three PNGs: speedup vs size, % of copy bandwidth vs size, time vs size per provider.

    In every panel, lines join the single tensors by size (solid: fp32, dashed: bf16 and
    others) and stars mark the whole models, whose names label the dotted vertical lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(run["modes"])
    title = f"{run['device']['name']} · {run['config']['kind']} · {run['date']}"
    legend = "lines: single tensors (solid fp32, dashed bf16) · stars: whole models"
    roles = run["providers"]
    measured = {r["provider"] for r in _ok(run)}
    fused = [p for p in roles if roles[p]["role"] == "fastsparse" and p in measured]
    baselines = [p for p in roles if roles[p]["role"] == "baseline" and p in measured]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = {}

    def grid(n):
        cols = 2 if n > 1 else 1
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.5 * rows), squeeze=False)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        return fig, list(axes.flat)

    def draw(ax, mode, provider, value, color, label):
        rows = {
            r["workload"]: r for r in _ok(run) if r["mode"] == mode and r["provider"] == provider
        }
        labelled = False
        for dtype, style in (("fp32", "-"), (None, "--")):
            pts = sorted(
                (w["weight_bytes"] / 1e6, value(rows[w["label"]]))
                for w in run["workloads"]
                if w["family"] == "tensor"
                and (w["dtype"] == "fp32") == (dtype == "fp32")
                and w["label"] in rows
                and value(rows[w["label"]])
            )
            if pts:
                ax.plot(
                    *zip(*pts),
                    style,
                    marker="o",
                    ms=4,
                    color=color,
                    label=None if labelled else label,
                )
                labelled = True
        stars = [
            (w["weight_bytes"] / 1e6, value(rows[w["label"]]))
            for w in run["workloads"]
            if w["family"] == "model" and w["label"] in rows and value(rows[w["label"]])
        ]
        if stars:
            ax.plot(*zip(*stars), "*", ms=11, color=color, label=None if labelled else label)

    def mark_models(ax):
        for w in run["workloads"]:
            if w["family"] == "model":
                x = w["weight_bytes"] / 1e6
                ax.axvline(x, ls=":", lw=0.8, color="gray")
                ax.text(
                    x,
                    1.0,
                    w["name"],
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=7,
                    color="gray",
                    transform=ax.get_xaxis_transform(),
                )

    # 1. speedup of each fastsparse provider vs each baseline, against workload size.
    fig, axes = grid(len(modes))
    for ax, mode in zip(axes, modes):
        pairs = [(f, b) for f in fused for b in baselines]
        for i, (f, b) in enumerate(pairs):
            name = f"vs {b}" if len(fused) == 1 else f"{f} vs {b}"
            draw(
                ax,
                mode,
                f,
                lambda r, b=b: r.get("speedup", {}).get(b),
                colors[i % len(colors)],
                name,
            )
        ax.axhline(1.0, color="black", lw=0.8)
        mark_models(ax)
        _axes(ax, mode, "weights (MB)", "speedup (x)", log_y=True)
    who = ", ".join(fused) or "fastsparse"
    fig.suptitle(f"Speedup of {who} vs baselines — {title}\n{legend}", fontsize=10)
    paths["speedup_png"] = _save(fig, out_dir / f"{stem}-speedup.png", plt)

    # 2. effective bandwidth as % of the copy bandwidth, every provider.
    fig, axes = grid(len(modes))
    for ax, mode in zip(axes, modes):
        for i, p in enumerate(roles):
            draw(ax, mode, p, lambda r: r.get("pct_copy"), colors[i % len(colors)], p)
        ax.axhline(100.0, color="black", lw=0.8)
        mark_models(ax)
        _axes(ax, mode, "weights (MB)", f"% of copy ({run['copy']['gbps']:.0f} GB/s)", log_y=True)
    fig.suptitle(f"Effective bandwidth, % of device copy — {title}\n{legend}", fontsize=10)
    paths["bandwidth_png"] = _save(fig, out_dir / f"{stem}-bandwidth.png", plt)

    # 3. per provider: median time against size, one color per mode.
    shown = [p for p in roles if any(r["provider"] == p for r in _ok(run))]
    fig, axes = grid(max(len(shown), 1))
    for ax, p in zip(axes, shown):
        for i, mode in enumerate(modes):
            draw(ax, mode, p, lambda r: r["median_ms"], colors[i % len(colors)], mode)
        mark_models(ax)
        _axes(ax, p, "weights (MB)", "median time (ms)", log_y=True)
    fig.suptitle(f"Time per provider — {title}\n{legend}", fontsize=10)
    paths["providers_png"] = _save(fig, out_dir / f"{stem}-providers.png", plt)
    return paths


def _axes(ax, title, xlabel, ylabel, log_y=False):
    ax.set_title(title)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- console


def summary(run: dict) -> str:
    """A plain-text pivot of median times (ms) per mode, for the terminal."""
    lines = [f"copy bandwidth {run['copy']['gbps']:.1f} GB/s"]
    for mode in run["modes"]:
        providers = _providers_with_rows(run, mode)
        if not providers:
            continue
        lines.append("")
        lines.append(f"{mode} (median ms)")
        width = max(len(p) for p in providers) + 1
        lines.append(f"{'workload':<26}" + "".join(f"{p:>{width}}" for p in providers))
        for w in run["workloads"]:
            cells = [_row(run, w["label"], mode, p) for p in providers]
            if any(cells):
                lines.append(
                    f"{w['label']:<26}"
                    + "".join(f"{_fmt(r['median_ms']) if r else '—':>{width}}" for r in cells)
                )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Redraw the markdown and plots of saved runs, or merge the parts of a split run.

    python -m benchmarks.report RUN.json [RUN.json ...]
    python -m benchmarks.report --merge PART.json PART.json ... --output RUN.json
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--merge", action="store_true", help="merge the runs into --output")
    p.add_argument("--output", type=Path, help="the merged run's JSON path")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    runs = [(path, json.loads(path.read_text())) for path in args.runs]
    if args.merge:
        if args.output is None:
            p.error("--merge needs --output")
        run = merge([r for _, r in runs])
        args.output.write_text(json.dumps(run, indent=1) + "\n")
        runs = [(args.output, run)]
    for path, run in runs:
        plots = write_plots(run, path.parent, path.stem)
        run["files"] = {"json": path.name, "markdown": path.with_suffix(".md").name}
        run["files"].update({k: Path(v).name for k, v in plots.items()})
        if (path.parent / "results.csv").exists():
            run["files"]["csv"] = "results.csv"
        path.with_suffix(".md").write_text(markdown(run))
        print(f"wrote {path.with_suffix('.md')} and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
