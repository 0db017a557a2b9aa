"""The host-overhead benchmark's smoke run: every row measured and recorded with its raw timings
(what it measures is in benchmarks/results, never asserted here)."""

import json

from benchmarks import host_overhead


def test_quick_run_records_every_row(tmp_path):
    assert host_overhead.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    rows = {r["row"]: r for r in result["results"]}
    assert set(rows) == {"foreach", "add_penalty_grad_", "prepared", "apply_", "apply_ new grads"}
    for name, row in rows.items():
        assert len(row["raw_us_per_call"]) == result["settings"]["rounds"]
        assert row["median_us"] > 0
        assert isinstance(row["meets_target"], bool) == (name in host_overhead.TARGET_ROWS)
    assert result["git"]["commit"] and result["versions"]["torch"]
    assert (tmp_path / next(tmp_path.glob("*.json")).name.replace(".json", ".md")).exists()
