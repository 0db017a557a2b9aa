"""The prepared GPU session: everything a short, lent GPU machine should run, in one command.

    python -m benchmarks.gpu_session --out "$OUT"             # on the GPU machine (~8 min)
    python -m benchmarks.gpu_session --out /tmp/s --dry-run   # on any machine: the same steps,
                                                               # CPU-safe forms, in seconds

Steps, each a subprocess with its own time limit, so that one hung step cannot eat the session:

1. versions: python, torch, triton, CUDA device and capability (the preinstalled torch 2.11 and
   triton 3.6 are used as they are);
2. install: ``pip install -e . --no-deps --no-build-isolation`` (no network there);
3. gpu tests: ``pytest -m gpu`` (dry run: only collected, which counts them);
4. native CUDA library: built just in time by fastsparse/backends/native.py (dry run: the compile
   command only);
5. kernels: one fused penalty, gradient and prox call per dtype on the GPU, then the compiled
   Triton kernels' registers and spills as loaded (dry run: skipped, no device);
6. host overhead: ``benchmarks.host_overhead`` on both GPU backends, a short run (dry run: CPU,
   ``--quick``);
7. benchmarks: ``benchmarks.run --device cuda --time-budget S`` into the output folder (dry run:
   ``--device cpu --quick``).

Everything lands in the output folder: ``summary.json`` (versions, per step its command,
status, seconds and log tail; the kernels' resources), ``session.log`` (every step's full output)
and the harness's own JSON, markdown and CSV under ``bench/``: few files, as a lent machine's
output allows. Commit the benchmark results into benchmarks/results/ afterwards as they are.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]

_VERSIONS = """
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    info["capability"] = list(torch.cuda.get_device_capability())
    info["cuda"] = torch.version.cuda
print(json.dumps(info))
"""

_NATIVE = """
from fastsparse.backends import native
print(native.build("cuda"))
"""

_NATIVE_DRY = """
from pathlib import Path
from fastsparse.backends import native
print(" ".join(map(str, native.compile_command("cuda", Path("cuda_kernels.cu"), Path("out.so")))))
"""

# One call of each fused path per dtype, then what the loaded Triton kernels use.
_KERNELS = """
import json, torch, fastsparse as fs
from fastsparse.backends.triton import penalty, prox
report = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in ((512, 512, 3, 3), (4096, 11008), (11008, 4096)):
        w = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
        fs.penalty(w, "l1l2", backend="triton").backward()
        fs.add_penalty_grad_(w, "group_lasso", 1e-4, backend="triton")
        fs.prox_(w.detach(), "group_lasso", 1e-3, backend="triton")
torch.cuda.synchronize()
# Triton's in-memory caches of compiled kernels (their layout differs between versions: what
# cannot be read is reported, not guessed).
for module in (penalty, prox):
    for name in dir(module):
        fn = getattr(module, name)
        caches = getattr(fn, "device_caches", None)
        if not caches:
            continue
        try:
            for entry in caches.values():
                for compiled in entry[0].values():
                    meta = compiled.metadata
                    report[f"{name}/{len(report)}"] = {
                        "n_regs": getattr(compiled, "n_regs", None),
                        "n_spills": getattr(compiled, "n_spills", None),
                        "shared": getattr(meta, "shared", None),
                        "num_warps": getattr(meta, "num_warps", None),
                    }
        except Exception as e:
            report[f"{name}/unreadable"] = f"{type(e).__name__}: {e}"
print(json.dumps(report))
"""


def _steps(out: Path, dry_run: bool, time_budget: int) -> List[dict]:
    python = sys.executable
    bench_dir = out / "bench"
    if dry_run:
        tests = [python, "-m", "pytest", "-m", "gpu", "--collect-only", "-q"]
        native = [python, "-c", _NATIVE_DRY]
        kernels = None
        bench = [python, "-m", "benchmarks.run", "--device", "cpu", "--quick"]
        host = [python, "-m", "benchmarks.host_overhead", "--device", "cpu", "--quick"]
        install = None
    else:
        tests = [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        native = [python, "-c", _NATIVE]
        kernels = [python, "-c", _KERNELS]
        bench = [python, "-m", "benchmarks.run", "--device", "cuda"]
        bench += ["--time-budget", str(time_budget)]
        host = [python, "-m", "benchmarks.host_overhead", "--rounds", "7", "--calls", "50"]
        install = [python, "-m", "pip", "install", "-q", "-e", ".", "--no-deps"]
        install += ["--no-build-isolation"]
    bench += ["--out-dir", str(bench_dir), "--no-plots"]
    host += ["--out", str(bench_dir)]
    return [
        {"name": "versions", "command": [python, "-c", _VERSIONS], "limit": 60},
        {"name": "install", "command": install, "limit": 120},
        {"name": "gpu_tests", "command": tests, "limit": 240},
        {"name": "native_cuda", "command": native, "limit": 120},
        {"name": "kernels", "command": kernels, "limit": 120},
        {"name": "host_overhead", "command": host, "limit": 60},
        {"name": "benchmarks", "command": bench, "limit": time_budget + 60},
    ]


def _run(step: dict, log) -> dict:
    record = {"name": step["name"], "command": step["command"], "limit_s": step["limit"]}
    if step["command"] is None:
        record["status"] = "skipped (dry run)"
        return record
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(
            step["command"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=step["limit"],
        )
        output, record["status"] = done.stdout + done.stderr, f"exit {done.returncode}"
        record["ok"] = done.returncode == 0
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        record["status"], record["ok"] = f"timed out after {step['limit']} s", False
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["tail"] = output[-2000:]
    log.write(f"===== {step['name']}: {record['status']} ({record['seconds']} s)\n{output}\n")
    log.flush()
    if record.get("ok") and step["name"] in ("versions", "kernels"):
        with contextlib.suppress(ValueError, IndexError):  # no JSON line: keep the tail only
            record["result"] = json.loads(output.strip().splitlines()[-1])
    return record


def main(argv: Optional[List[str]] = None) -> int:
    """Run the session's steps; returns 0 when every step that ran succeeded."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output folder ($OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU-safe forms of every step")
    parser.add_argument(
        "--time-budget", type=int, default=210, help="seconds of benchmark cases (default 210)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    with open(args.out / "session.log", "w") as log:
        for step in _steps(args.out, args.dry_run, args.time_budget):
            record = _run(step, log)
            records.append(record)
            print(f"{record['name']:12s} {record['status']}", flush=True)
    summary = {"dry_run": args.dry_run, "steps": records}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if all(r.get("ok", True) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
