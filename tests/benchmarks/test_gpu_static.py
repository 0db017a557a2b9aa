"""The ahead-of-time GPU compile check (benchmarks/gpu_static.py) on its bounded subset: every
path launches, every specialization compiles for sm_80 and sm_90 without a spill and without
approximate square roots or divisions, contiguous bf16 groups get 16-byte loads, and the table
reports the registers, spills and code features of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")

from fastsparse.backends.triton.common import launch_options  # noqa: E402  (needs triton)
from fastsparse.core.contract import PROX_KINDS  # noqa: E402


def test_quick_subset_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT kernels
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_static", "--quick", "--fail-on-spill",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr  # no compile error, no spill
    (path,) = tmp_path.glob("gpu-static-*-quick.json")
    run = json.loads(path.read_text())
    kernels = {r["kernel"] for r in run["rows"]}
    paths = {r["path"] for r in run["rows"]}
    assert {"penalty backward l1l2", "selective decay"} <= paths
    # Every prox kind compiles: the interpreter runs a branch whose types differ as Python, so
    # only a compile shows it (group_l0 once returned fp32 from one branch and fp64 from the
    # other); the fused step shares the group factor.
    assert {f"prox {kind}" for kind in PROX_KINDS} | {"sgd step + prox group_l0"} <= paths
    assert {"_group_stats_kernel", "_penalty_grad_kernel", "_prox_kernel",
            "_step_prox_kernel"} <= kernels  # fmt: skip
    for row in run["rows"]:
        assert [c["arch"] for c in row["compiled"]] == [80, 90]
        assert row["maxnreg"] == launch_options(row["num_warps"])["maxnreg"], row
        for c in row["compiled"]:
            assert c["registers"] and 0 < c["registers"] <= row["maxnreg"], row
            assert c["stack_bytes"] == c["local_bytes"] == 0 and not c["spills"], row
            assert c["approx_sqrt"] == c["approx_div"] == 0, row  # IEEE sqrt and division
    assert run["summary"]["compiled"] == 2 * len(run["rows"])
    assert run["summary"]["spilling"] == 0
    # Contiguous, aligned groups (VEC > 0) of bf16 weights load 16 bytes at a time.
    wide = [r for r in run["rows"] if r["constexprs"].get("VEC") and r["num_warps"] >= 8]
    assert wide and all(c["vector_loads"] > 0 for r in wide for c in r["compiled"])
    # The flat kernels too: selective decay and feature flow on aligned dense tensors.
    flat = [r for r in run["rows"] if r["path"] in ("selective decay", "feature flow")]
    assert {r["path"] for r in flat} == {"selective decay", "feature flow"}
    for row in flat:
        assert row["constexprs"]["VEC"] > 0, row
        assert all(c["vector_loads"] > 0 and c["vector_stores"] > 0 for c in row["compiled"]), row
    text = next(tmp_path.glob("gpu-static-*-quick.md")).read_text()
    assert "| _prox_kernel |" in text and "Summary:" in text


def test_refuses_the_interpreter(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_static", "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "TRITON_INTERPRET" in result.stderr
