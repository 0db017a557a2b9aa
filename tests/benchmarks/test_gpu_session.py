"""The prepared GPU session runs end to end in its dry-run form on a CPU machine."""

import json

from benchmarks import gpu_session


def test_dry_run_writes_the_summary_and_the_benchmark(tmp_path):
    assert gpu_session.main(["--out", str(tmp_path), "--dry-run"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [
        "versions", "install", "gpu_tests", "native_cuda", "kernels", "host_overhead", "benchmarks"
    ]  # fmt: skip
    assert steps["versions"]["result"]["torch"]
    assert "tests collected" in steps["gpu_tests"]["tail"]
    assert "nvcc" in steps["native_cuda"]["tail"] and "sm_90" in steps["native_cuda"]["tail"]
    assert steps["install"]["status"] == steps["kernels"]["status"] == "skipped (dry run)"
    suffixes = sorted(p.suffix for p in (tmp_path / "bench").iterdir())
    assert suffixes == [".csv", ".json", ".json", ".md", ".md"]  # the harness, host overhead
    assert (tmp_path / "session.log").read_text().count("=====") == 5
