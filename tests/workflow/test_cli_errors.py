"""Bad settings the CLI meets, each reported in one line with exit status 2, before training."""

import json
import sys
from pathlib import Path

import pytest

from fastsparse.workflow import cli, study


def _run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend(capsys, monkeypatch, backend):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    status, _, err = _run(capsys, "demo", "--backend", backend, "--device", "cpu")
    assert status == 2
    assert err.count("\n") == 1 and f"backend {backend!r} is not available" in err


def test_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    status, _, err = _run(capsys, "train", "--out", str(target), "--epochs", "1")
    assert status == 2 and err.count("\n") == 1 and "is a file, not a folder" in err


def test_out_cannot_be_written(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, _, err = _run(capsys, "study", "--out", str(blocker / "sub"), "--kinds", "l1")
    assert status == 2 and err.count("\n") == 1 and "cannot be written" in err


def test_config_path_is_a_folder(capsys, tmp_path):
    status, _, err = _run(capsys, "train", "--config", str(tmp_path))
    assert status == 2 and err.count("\n") == 1 and "is a folder" in err


def test_unknown_method_option_lists_the_valid_ones(capsys, tmp_path):
    status, _, err = _run(
        capsys, "train", "--kind", "slimming", "--model", "vgg11_bn", "--out", str(tmp_path),
        "--method-options", json.dumps({"bogus": 1}), "--epochs", "1",
    )  # fmt: skip
    assert status == 2
    assert "unknown option(s) 'bogus' for method 'slimming'" in err
    assert "valid options: backend, inplace, ratio" in err
    assert "slimming_regularizer" not in err  # no internal function names


def test_study_without_matplotlib_keeps_the_csv(tmp_path, monkeypatch, capsys):
    real_find_spec = study.importlib.util.find_spec
    monkeypatch.setattr(
        study.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would fail
    committed = Path(__file__).resolve().parents[2] / "results" / "study-lenet5" / "results.csv"
    study.write_outputs(tmp_path, study.read_rows(committed))
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "results.md").is_file()
    assert not (tmp_path / "tradeoff.png").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed" in err
