"""The fastsparse command: a tiny run of each command, and the error cases.

Every run is one epoch on a few hundred images of the bundled subset (seconds). Error cases must
exit with status 2 and a one-line message on stderr, before any training.
"""

import csv
import json
import subprocess
import sys

import pytest
import torch

from fastsparse.pruning import load_pruned
from fastsparse.workflow import cli
from fastsparse.workflow import run as runs
from fastsparse.workflow.models import get_model

TINY = ["--epochs", "1", "--train-samples", "256", "--test-samples", "128", "--no-progress"]


def _main(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything starts training."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training started despite a bad setting")

    monkeypatch.setattr(runs, "train", forbidden)


# --------------------------------------------------------------------------- demo


def test_demo_tiny(capsys):
    status, out, err = _main(capsys, "demo", *TINY)
    assert status == 0, err
    assert "fastsparse demo: lenet5 on mnist_subset (256 train / 128 test images)" in out
    for text in (
        "test accuracy",
        "filters features.0 (Conv2d)",
        "filters features.3 (Conv2d)",
        "neurons classifier.0 (Linear)",
        "parameters",
        "FLOPs (multiply-adds / image)",
        "inference time (128 test images)",
        "regularizer cost per training step, fused backend vs eager oracle:",
        "eager oracle (torch):",
    ):
        assert text in out
    fused_line = out.split("eager oracle:\n")[1].splitlines()[0]
    assert fused_line.startswith(("  fused (", "  no fused CPU backend is available ("))


def test_demo_progress_bar(capsys):
    status, out, err = _main(capsys, "demo", *TINY[:-1], "--backend", "torch")
    assert status == 0
    assert "epoch 1/1 [" in err and "train acc" in err


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "fastsparse", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for command in ("demo", "train", "study", "bench"):
        assert command in proc.stdout


# --------------------------------------------------------------------------- train


def test_train_from_flags(tmp_path, capsys):
    out = tmp_path / "run"
    status, stdout, err = _main(
        capsys, "train", *TINY, "--kind", "l1", "--strength", "1e-4", "--mode", "inplace",
        "--backend", "torch", "--out", str(out),
    )  # fmt: skip
    assert status == 0, err
    for name in ("config.json", "checkpoint.pt", "model.pt", "pruned.pt", "report.txt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["kind"] == "l1" and len(metrics["epochs"]) == 1
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["mode"] == "inplace"
    pruned = load_pruned(get_model("lenet5"), torch.load(out / "pruned.pt"))
    assert pruned(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_train_from_json_config_with_flag_override(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "kind": "group_lasso",
                "strength": 1e-3,
                "epochs": 3,
                "train_samples": 256,
                "test_samples": 128,
                "schedule": "cosine",
            }
        )
    )
    out = tmp_path / "run"
    status, _, err = _main(
        capsys, "train", "--config", str(config), "--epochs", "1", "--no-progress",
        "--out", str(out),
    )  # fmt: skip
    assert status == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["kind"] == "group_lasso" and saved["schedule"] == "cosine"
    assert saved["epochs"] == 1  # the flag wins over the file


def test_train_from_toml_config(tmp_path, capsys):
    pytest.importorskip("tomllib")
    config = tmp_path / "run.toml"
    config.write_text(
        'kind = "none"\nepochs = 1\ntrain_samples = 256\ntest_samples = 128\ngroups = "none"\n'
    )
    status, _, err = _main(
        capsys, "train", "--config", str(config), "--no-progress", "--out", str(tmp_path / "r")
    )
    assert status == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["kind"] is None and saved["groups"] is None


# --------------------------------------------------------------------------- study


def test_study_tiny(tmp_path, capsys):
    out = tmp_path / "study"
    status, stdout, err = _main(
        capsys, "study", *TINY, "--out", str(out), "--kinds", "l1,group_l1l2",
        "--strengths", "1e-4", "--strengths", "group_l1l2=0.1,0.3", "--thresholds", "0.05,0.2",
        "--backend", "torch",
    )  # fmt: skip
    assert status == 0, err
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    runs = [(r["kind"], float(r["strength"])) for r in rows]
    # none, l1 at 1e-4, group_l1l2 at 0.1 and 0.3; two thresholds each
    assert runs == [(k, s) for k, s in [("none", 0), ("l1", 1e-4), ("group_l1l2", 0.1),
                                        ("group_l1l2", 0.3)] for _ in range(2)]  # fmt: skip
    assert [float(r["threshold"]) for r in rows[:2]] == [0.05, 0.2]
    table = (out / "results.md").read_text()
    assert "| group_l1l2 |" in table and "Most removed within 1 point" in table
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert (out / "command.txt").read_text().startswith("fastsparse study --epochs 1")
    assert "8 rows" in stdout


# --------------------------------------------------------------------------- bench


def test_bench_delegates(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli.bench, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--quick", "--kinds", "l1"]) == 0
    assert cli.main(["bench", "--help"]) == 0
    assert seen == [["--quick", "--kinds", "l1"], ["--help"]]


def test_bench_missing_harness(monkeypatch, tmp_path, capsys):
    from fastsparse.workflow import bench

    # An installed package without a source checkout beside it: no benchmarks/ anywhere.
    monkeypatch.setattr(bench, "find_harness", lambda: None)
    status, _, err = _main(capsys, "bench")
    assert status == 2
    assert err.count("\n") == 1 and "needs the benchmark harness of a source checkout" in err


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--kind", "l3"], "unknown kind 'l3'"),
        (["train", "--kind", "l3"], "unknown kind 'l3'"),
        (["study", "--kinds", "l1,l3"], "unknown kind 'l3'"),
        (["study", "--strengths", "l3=0.1"], "unknown kind 'l3' in --strengths"),
        (["study", "--strengths", "1e-3,abc"], "comma-separated numbers"),
        (["train", "--dataset", "mnist", "--data-dir", "/no/such/dir"], "does not exist"),
        (["train", "--dataset", "cifar10"], "needs data_dir"),
        (["train", "--config", "/no/such/config.json"], "does not exist"),
        (["demo", "--kind", "none"], "give a penalty --kind"),
        (["demo", "--epochs", "0"], "epochs must be >= 1"),
    ],
)
def test_errors(argv, message, capsys, no_training):
    status, out, err = _main(capsys, *argv)
    assert status == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_empty_data_directory(tmp_path, capsys, no_training):
    status, _, err = _main(capsys, "train", "--dataset", "mnist", "--data-dir", str(tmp_path))
    assert status == 2 and "not found" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.json", '{"kind": "l1",', "not valid JSON"),
        ("bad.toml", "kind = ", "not valid TOML"),
        ("list.json", "[1, 2]", "expected a table of settings"),
        ("keys.json", '{"kind": "l1", "epoch": 3}', "unknown setting(s) epoch"),
        ("type.json", '{"epochs": "ten"}', "epochs must be an integer"),
        ("kind.toml", 'kind = "l3"', "unknown kind 'l3'"),
        ("config.yaml", "kind: l1", "expected a .json or .toml file"),
    ],
)
def test_malformed_config(tmp_path, capsys, no_training, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    status, _, err = _main(capsys, "train", "--config", str(path), "--out", str(tmp_path / "o"))
    assert status == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_no_command_prints_help(capsys):
    status, out, _ = _main(capsys)
    assert status == 2 and "demo" in out


def test_study_resume_skips_finished_runs(tmp_path, capsys, monkeypatch):
    from fastsparse.workflow import study

    out = str(tmp_path / "study")
    common = [*TINY, "--out", out, "--kinds", "l1", "--thresholds", "0.05", "--no-baseline"]
    common += ["--backend", "torch"]
    assert cli.main(["study", *common, "--strengths", "1e-4"]) == 0
    first = (tmp_path / "study" / "results.csv").read_text().splitlines()
    calls = []
    original = study.run
    monkeypatch.setattr(
        study, "run", lambda config, **kw: calls.append(config) or original(config, **kw)
    )
    assert cli.main(["study", *common, "--strengths", "1e-4,3e-4", "--resume"]) == 0
    capsys.readouterr()
    assert [c.strength for c in calls] == [3e-4]  # 1e-4 was already in results.csv
    second = (tmp_path / "study" / "results.csv").read_text().splitlines()
    assert second[:2] == first and len(second) == 3
