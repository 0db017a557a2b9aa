"""The pruning zoo (benchmarks/prune_zoo.py) on three cheap torchvision models: producer-side
zeroing of 30% of each coupled group, then `fastsparse.prune`, must be lossless and smaller."""

import pytest

pytest.importorskip("torchvision", reason="the zoo's models are torchvision's")

from benchmarks import prune_zoo  # noqa: E402


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_0"])
def test_zoo_model_prunes_losslessly(name):
    row = prune_zoo.run_one(name)
    assert row["status"] == "pruned", row
    assert row["rel_diff"] <= 1e-5
    assert row["params_after"] < 0.8 * row["params"]
    assert row["flops_after"] < 0.8 * row["flops"]
    assert row["left_whole"] == []


def test_zoo_table_has_a_row_per_model_with_its_reason():
    rows = [
        {"model": "a", "status": "refused", "params": 10**6, "flops": 10**9, "reason": "why | not"},
        {
            "model": "b",
            "status": "pruned",
            "params": 2 * 10**6,
            "params_after": 10**6,
            "flops": 10**9,
            "flops_after": 5 * 10**8,
            "rel_diff": 1e-7,
            "prune_s": 1.5,
            "rss_mb": 2048.0,
            "left_whole": [],
        },
    ]
    lines = prune_zoo.table(rows).splitlines()
    assert len(lines) == 4
    assert "| a | refused | 1.00M | 1.00G |" in lines[2] and "why \\| not" in lines[2]
    assert "2.00M → 1.00M (-50%)" in lines[3] and "1.0e-07" in lines[3] and "2.0 GB" in lines[3]
