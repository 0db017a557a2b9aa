"""Host overhead: what one in-place penalty call costs beside `torch._foreach_add_` over the
same tensors, with plans cached (tiny tensors, so that the time is the host's, not the work's).

    python -m benchmarks.host_overhead                   # 10, 100 and 161 tensors of 8x4
    python -m benchmarks.host_overhead --quick --out /tmp/h   # CI smoke: seconds

Rows, each timed in the same rounds, interleaved (these machines are shared and noisy):

    foreach              torch._foreach_add_(grads, ones): the yardstick
    add_penalty_grad_    the function, which validates every tensor on every call
    prepared             fastsparse.functional.PreparedPenaltyGrad: validated once; a call checks
                         each tensor's address, shape and strides, and its .grad (which tensor,
                         and its address)
    apply_               Regularizer.apply_ (a PreparedPenaltyGrad inside)
    apply_ new grads     Regularizer.apply_ with a new set of gradients each call, as after
                         zero_grad(set_to_none=True) (two sets, alternated)

Each round times `--calls` back-to-back calls of every row (CUDA: then a synchronize, so the
time is the issue rate) after `--warmup` untimed ones; a row's figure is the median over rounds
of its time per call, and its ratio the median over rounds of (its time / foreach's time in the
same round). The target is a ratio of at most TARGET_RATIO for `prepared` and `apply_`.
Results go to benchmarks/results/host-overhead-<device>-<date>[-tag].{json,md}, written here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

import fastsparse
from benchmarks.run import RESULTS_DIR, environment, load_average

TARGET_RATIO = 3.0
TARGET_ROWS = ("prepared", "apply_")
COUNTS = (10, 100, 161)
SHAPE = (8, 4)
STRENGTH = 1e-4


def _tensors(count: int, shape, device, dtype) -> List[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(count)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype).to(device))
        p.grad = torch.zeros_like(p)
        params.append(p)
    return params


def rows_for(params, kind: str, backend: str) -> Dict[str, Callable[[], object]]:
    """The calls to time, each over `params` (their .grad is updated in place)."""
    grads = [p.grad for p in params]
    ones = [torch.ones_like(p) for p in params]
    prepared = fastsparse.functional.PreparedPenaltyGrad(params, kind, backend=backend)
    reg = fastsparse.Regularizer(params, kind, STRENGTH, backend=backend)
    fresh = fastsparse.Regularizer(params, kind, STRENGTH, backend=backend)
    sets = [grads, [g.clone() for g in grads]]
    turn = [0]

    def apply_new_grads():
        turn[0] ^= 1
        for p, g in zip(params, sets[turn[0]]):
            p.grad = g
        return fresh.apply_()

    def restore():
        for p, g in zip(params, grads):
            p.grad = g

    return {
        "foreach": lambda: torch._foreach_add_(grads, ones),
        "add_penalty_grad_": lambda: fastsparse.add_penalty_grad_(
            params, kind, STRENGTH, backend=backend
        ),
        "prepared": lambda: prepared(STRENGTH),
        "apply_": reg.apply_,
        "apply_ new grads": apply_new_grads,
        "_restore": restore,
    }


def _time_calls(fn, calls: int, device: torch.device) -> float:
    """Seconds per call over `calls` back-to-back calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def measure(params, kind, backend, rounds, calls, warmup, device) -> Dict[str, dict]:
    rows = rows_for(params, kind, backend)
    restore = rows.pop("_restore")
    for fn in rows.values():
        for _ in range(warmup):
            fn()
        restore()
    times: Dict[str, List[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            times[name].append(_time_calls(fn, calls, device))
            restore()
    baseline = times["foreach"]
    out = {}
    for name, seconds in times.items():
        ratios = [s / b for s, b in zip(seconds, baseline)]
        out[name] = {
            "median_us": statistics.median(seconds) * 1e6,
            "ratio_to_foreach": statistics.median(ratios),
            "raw_us_per_call": [s * 1e6 for s in seconds],
        }
    return out


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backends = args.backends or (["triton", "native"] if device.type == "cuda" else ["native"])
    env = environment(device)
    results = []
    for backend in backends:
        for count in args.counts:
            params = _tensors(count, args.shape, device, dtype)
            rows = measure(params, args.kind, backend, args.rounds, args.calls, args.warmup, device)
            for name, row in rows.items():
                meets = row["ratio_to_foreach"] <= TARGET_RATIO if name in TARGET_ROWS else None
                results.append({"backend": backend, "tensors": count, "row": name,
                                "meets_target": meets, **row})  # fmt: skip
                print(f"{backend:7} {count:4} tensors  {name:18} {row['median_us']:9.1f} us  "
                      f"{row['ratio_to_foreach']:5.2f}x foreach", flush=True)  # fmt: skip
    return {
        "schema": 1,
        "tool": "benchmarks.host_overhead",
        "date": datetime.date.today().isoformat(),
        "settings": {
            "kind": args.kind,
            "shape": list(args.shape),
            "dtype": args.dtype,
            "strength": STRENGTH,
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "warmup": args.warmup,
            "target_ratio": TARGET_RATIO,
            "target_rows": list(TARGET_ROWS),
        },
        **env,
        "load_after": load_average(),
        "results": results,
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    dev, ver, git = result["device"], result["versions"], result["git"]
    lines = [
        f"# Host overhead, {dev['name']} ({result['date']})",
        "",
        f"Written by `python -m benchmarks.host_overhead`. torch {ver['torch']}, triton "
        f"{ver['triton']}, commit {git.get('commit', '?')[:12]}"
        f"{' (dirty)' if git.get('dirty') else ''}; {dev['threads']} torch threads, load "
        f"{dev['load_before']} before, {result['load_after']} after.",
        "",
        f"`{s['kind']}` over N tensors of {'x'.join(map(str, s['shape']))} {s['dtype']}, "
        f"strength {s['strength']}; {s['rounds']} rounds of {s['calls_per_round']} calls per "
        f"row, interleaved. Median time per call, and the median over rounds of the ratio to "
        f"`torch._foreach_add_` over the same tensors in the same round (target for "
        f"{', '.join(f'`{r}`' for r in s['target_rows'])}: at most {s['target_ratio']:g}x).",
        "",
        "| backend | tensors | call | µs per call | × foreach | target |",
        "|---|---:|---|---:|---:|---|",
    ]
    for r in result["results"]:
        target = {True: "met", False: "**missed**", None: ""}[r["meets_target"]]
        lines.append(f"| {r['backend']} | {r['tensors']} | {r['row']} | {r['median_us']:.1f} | "
                     f"{r['ratio_to_foreach']:.2f} | {target} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path, tag: Optional[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"host-overhead-{result['device']['slug']}-{result['date']}" + (f"-{tag}" if tag else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(result))
    return out_dir / f"{stem}.md"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", choices=("native", "triton"))
    p.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    p.add_argument("--shape", nargs="+", type=int, default=list(SHAPE))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    p.add_argument("--kind", default="group_lasso", choices=fastsparse.KINDS)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="3 rounds of 5 calls, 10 tensors")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.calls, args.warmup, args.counts = 3, 5, 2, [10]
    path = write(run(args), args.out, args.tag)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
