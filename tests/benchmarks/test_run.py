"""Smoke tests of the benchmark harness (benchmarks/): it runs end to end on tiny CPU sizes and
writes well-formed JSON, CSV, markdown and plots. No assertion anywhere is about speed.
"""

import csv
import importlib.util
import json
import math

import pytest
import torch

# The checkout's root is on sys.path under pytest (tests/ is a package beside benchmarks/).
from benchmarks import providers as bp
from benchmarks import report, workloads
from benchmarks import run as harness
from fastsparse import reference
from fastsparse.core.contract import KINDS
from fastsparse.workflow import bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATUSES = {"ok", "skipped", "failed"}


def run_quick(tmp_path, *extra):
    argv = ["--device", "cpu", "--quick", "--out-dir", str(tmp_path), *extra]
    assert harness.main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def test_quick_run_writes_every_file(tmp_path):
    providers = ["fastsparse-native", "eager-oracle", "handwritten", "torch-pruning", "copy"]
    run = run_quick(tmp_path, "--providers", *providers)

    files = run["files"]
    assert set(files) >= {"json", "markdown", "csv", "speedup_png", "bandwidth_png"}
    for key, name in files.items():
        path = tmp_path / name
        assert path.is_file(), key
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC

    assert run["schema"] == harness.SCHEMA
    assert run["device"]["type"] == "cpu" and run["versions"]["torch"] == torch.__version__
    assert run["git"]["commit"] and run["copy"]["gbps"] > 0
    labels = {w["label"] for w in run["workloads"]}
    expected = len(labels) * len(harness.MODES) * len(providers)
    assert len(run["results"]) == expected
    for row in run["results"]:
        assert row["status"] in STATUSES and row["workload"] in labels
        assert row["status"] != "failed", row
        if row["status"] == "ok":
            assert len(row["raw_ms"]) == row["repeats"] >= 1
            assert all(math.isfinite(t) and t > 0 for t in row["raw_ms"])
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["bytes"] > 0 and row["pct_copy"] > 0
            assert row["check"]["status"] in ("ok", "n/a"), row
        else:
            assert row["reason"]
    eager = [r for r in run["results"] if r["provider"] == "eager-oracle"]
    for r in eager:  # an optimizer steps weights with gradients of their own dtype
        mixed = r["workload"].endswith("bf16/fp32") and r["mode"] == "prox_step"
        assert r["status"] == ("skipped" if mixed else "ok"), r
    tp = [r for r in run["results"] if r["provider"] == "torch-pruning" and r["status"] == "ok"]
    assert {r["mode"] for r in tp} == {"inplace"} and {r["workload"] for r in tp} == {"lenet5 fp32"}
    for row in run["results"]:
        if row["role"] == "fastsparse" and row["status"] == "ok":
            # handwritten has no optimizer step: the eager loop is the baseline there
            baselines = {"eager-oracle"} | (
                {"handwritten"} if row["mode"] != "prox_step" else set()
            )
            assert set(row["speedup"]) >= baselines

    with open(tmp_path / files["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == report.CSV_COLUMNS and len(rows) == 1 + expected

    text = (tmp_path / files["markdown"]).read_text()
    assert text.startswith("# fastsparse benchmarks")
    for mode in harness.MODES:
        assert f"## {mode}:" in text


@pytest.mark.parametrize("step", ["sgd", "adamw"])
def test_optimizer_step_mode_against_the_plain_step(tmp_path, step):
    providers = ["fastsparse-native", "eager-oracle", "torchao-pat", "plain-step"]
    run = run_quick(tmp_path, "--modes", "prox_step", "--step-optimizer", step, "--no-plots",
                    "--workloads", "lenet5", "--providers", *providers)  # fmt: skip
    assert run["config"]["step_optimizer"] == step
    rows = {r["provider"]: r for r in run["results"] if r["workload"] == "lenet5 fp32"}
    assert rows["plain-step"]["status"] == "ok" and "over_base_ms" not in rows["plain-step"]
    for name in ("fastsparse-native", "eager-oracle"):
        assert rows[name]["check"]["status"] == "ok", rows[name]
        assert math.isfinite(rows[name]["over_base_ms"])
    pat = rows["torchao-pat"]
    assert pat["status"] == ("ok" if importlib.util.find_spec("torchao") else "skipped")
    text = (tmp_path / run["files"]["markdown"]).read_text()
    assert "Cost over the plain step" in text


def test_csv_is_appended_and_reports_redraw(tmp_path):
    argv = ["--workloads", "lenet5.conv2", "--providers", "eager-oracle", "--no-plots"]
    first = run_quick(tmp_path, *argv)
    run_quick(tmp_path, *argv, "--modes", "value")
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == report.CSV_COLUMNS
    assert len(rows) == 1 + len(first["results"]) + 1
    assert report.main([str(tmp_path / first["files"]["json"])]) == 0
    assert list(tmp_path.glob("*-speedup.png"))


def test_parts_of_a_split_run_merge(tmp_path):
    a = run_quick(
        tmp_path / "a",
        "--workloads",
        "lenet5.conv2",
        "--no-plots",
        "--providers",
        "eager-oracle",
        "fastsparse-native",
    )
    b = run_quick(
        tmp_path / "b",
        "--workloads",
        "lenet5 fp32",
        "--no-plots",
        "--providers",
        "eager-oracle",
        "handwritten",
    )
    out = tmp_path / "merged.json"
    paths = [str(tmp_path / "a" / a["files"]["json"]), str(tmp_path / "b" / b["files"]["json"])]
    assert report.main(["--merge", *paths, "--output", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert len(merged["results"]) == len(a["results"]) + len(b["results"])
    assert {w["label"] for w in merged["workloads"]} == {"lenet5.conv2 fp32", "lenet5 fp32"}
    assert set(merged["providers"]) == {"eager-oracle", "fastsparse-native", "handwritten"}
    assert out.with_suffix(".md").read_text().startswith("# fastsparse benchmarks")


class Broken(bp.Provider):
    name = "broken"
    role = bp.FASTSPARSE

    def penalty(self, case, tensors):
        raise RuntimeError("boom")


class Absent(bp.Provider):
    name = "absent"

    def unavailable(self, case):
        return "not built here"


def test_failing_and_absent_providers_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "all_providers", lambda: [Broken(), Absent(), bp.EagerOracle()])
    run = run_quick(tmp_path, "--workloads", "lenet5.conv2", "--modes", "value", "inplace")
    status = {(r["provider"], r["mode"]): (r["status"], r["reason"]) for r in run["results"]}
    assert status["broken", "value"] == ("failed", "RuntimeError: boom")
    assert status["broken", "inplace"][0] == "failed"  # add_grad_ is not implemented
    assert status["absent", "value"] == ("skipped", "not built here")
    assert status["eager-oracle", "inplace"][0] == "ok"
    text = (tmp_path / run["files"]["markdown"]).read_text()
    assert "RuntimeError: boom" in text and "not built here" in text
    assert (
        harness.main(
            [
                "--device",
                "cpu",
                "--quick",
                "--out-dir",
                str(tmp_path / "s"),
                "--workloads",
                "lenet5.conv2",
                "--modes",
                "value",
                "--strict",
                "--no-plots",
            ]
        )
        == 1
    )


def test_time_budget_skips_the_rest_and_still_writes(tmp_path):
    run = run_quick(tmp_path, "--workloads", "lenet5.conv2", "--time-budget", "0", "--no-plots")
    assert run["complete"] and run["results"]
    assert all(r["status"] == "skipped" for r in run["results"])
    assert not list(tmp_path.glob("*.partial.json"))


def test_triton_provider_runs_under_the_interpreter(tmp_path):
    from fastsparse.backends import triton_interpreter_enabled

    run = run_quick(
        tmp_path,
        "--workloads",
        "lenet5.conv2",
        "--providers",
        "fastsparse-triton",
        "--allow-interpreter",
        "--no-plots",
    )
    expected = "ok" if triton_interpreter_enabled() else "skipped"
    for row in run["results"]:
        assert row["status"] == expected, row
        if expected == "ok":
            assert row["check"]["status"] == "ok"


def test_compiled_oracle_runs(tmp_path):
    run = run_quick(
        tmp_path,
        "--workloads",
        "lenet5.conv2",
        "--providers",
        "compile-default",
        "--modes",
        "value",
        "--no-plots",
    )
    (row,) = run["results"]
    assert row["status"] == "ok" and row["check"]["status"] == "ok", row


def test_bytes_model():
    w = workloads.tensor_workload("lenet5.conv2", torch.float32)
    W = 50 * 20 * 5 * 5 * 4
    sizes = {name: mode.min_bytes(w, "filters") for name, mode in harness.MODES.items()}
    assert sizes == {
        "value": W,
        "value_grad": 2 * W,
        "inplace": 3 * W,
        "group_norms": W + 200,
        "prox_step": 5 * W,  # read W, G, momentum; write W, momentum
    }
    llama = workloads.llama_workload(1)
    assert llama.numel == 202_383_360
    assert harness.MODES["inplace"].min_bytes(llama, "filters") == llama.numel * (2 + 4 + 4)


def test_model_shapes_are_the_real_architectures():
    resnet = workloads.model_workload("resnet50")
    assert resnet.numel == 25_557_032 and len(resnet.shapes) == 161  # torchvision's resnet50
    assert workloads.model_workload("lenet5").numel == 431_080
    assert resnet.names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert resnet.names[-2:] == ["fc.weight", "fc.bias"]


SHAPES = [(6, 4, 3, 3), (5, 7), (6,), (3, 5, 2)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", ["filters", None, ("filters", "channels")], ids=str)
def test_handwritten_baseline_matches_the_oracle(kind, groups):
    shapes = [s for s in SHAPES if len(s) >= 2] if groups != "filters" and groups else SHAPES
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    with torch.no_grad():
        params[0][1].zero_()  # a zero group
    case = bp.Case(None, params, None, kind, groups, 0.3, 0.5, torch.device("cpu"))
    hand = bp.Handwritten()
    alpha = 0.3
    expected = reference.penalty([p.detach() for p in params], kind, groups, alpha)
    expected_grads = reference.penalty_grad([p.detach() for p in params], kind, groups, alpha)

    value = hand.penalty(case, params)
    value.backward()
    torch.testing.assert_close(value.detach(), expected)
    for p, g in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, g)
        p.grad = torch.ones_like(p)
    torch.testing.assert_close(hand.add_grad_(case), expected)
    for p, g in zip(params, expected_grads):
        torch.testing.assert_close(p.grad, 1 + 0.5 * g)
    if not isinstance(groups, tuple):
        for got, ref in zip(
            hand.group_norms(case, case.weights), reference.group_norms(case.weights, groups)
        ):
            torch.testing.assert_close(got, ref.flatten())


def test_fastsparse_bench_finds_the_checkout(capfd, monkeypatch, tmp_path):
    assert bench.find_harness() == (harness.REPO_ROOT / "benchmarks")
    assert bench.main(["--list"]) == 0
    assert "eager-oracle" in capfd.readouterr().out
    monkeypatch.setenv(bench.ENV_VAR, str(tmp_path))  # not a harness: falls back to the checkout
    assert bench.find_harness() == (harness.REPO_ROOT / "benchmarks")


def test_fastsparse_bench_runs_the_checkout_not_a_namesake(capfd, monkeypatch, tmp_path):
    # A `benchmarks` package in the working directory must not shadow the checkout's harness.
    decoy = tmp_path / "benchmarks"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("")
    (decoy / "run.py").write_text("def main(argv):\n    print('decoy')\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--list"]) == 0
    out = capfd.readouterr().out
    assert "eager-oracle" in out and "decoy" not in out
