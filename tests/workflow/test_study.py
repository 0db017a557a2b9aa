"""`fastsparse study` with the sparsity methods: every method in one study, per-method options,
and the errors of a study (or a train/demo command) that cannot run, before any training.

Runs are tiny (one epoch on a hundred images, oracle backend): they check the wiring (the CSV and
the table have the methods' rows, the options reach each method), not what the methods achieve.
"""

import csv

import pytest

from fastsparse.methods import METHODS
from fastsparse.workflow import cli


def test_study_includes_every_method(tmp_path, capsys):
    out = tmp_path / "study"
    status = cli.main(
        ["study", "--out", str(out), "--model", "vgg11_bn", "--kinds", ",".join(METHODS),
         "--strengths", "1e-3", "--thresholds", "0.05", "--no-baseline", "--no-progress",
         "--epochs", "1", "--train-samples", "64", "--test-samples", "32", "--batch-size", "32",
         "--backend", "torch", "--method-options", "{}"]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert status == 0, err
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == list(METHODS)
    assert all(float(r["strength"]) == 1e-3 for r in rows)
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["study", "--kinds", "feature_flow"], "method 'feature_flow' on model 'lenet5'"),
        (["study", "--kinds", "slimming,oicsr2"], "unknown kind 'oicsr2'"),
        (["demo", "--kind", "slimming"], "give a penalty --kind"),
    ],
)
def test_study_and_train_errors(argv, message, tmp_path, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("fastsparse.workflow.run.train", no_training)
    status = cli.main([*argv, "--out", str(tmp_path / "o")] if argv[0] != "demo" else argv)
    _, err = capsys.readouterr()
    assert status == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "text, message", [("[1]", "must be a JSON object"), ("{x", "is not valid JSON")]
)
def test_bad_method_options_flag(text, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects it, with the usage line
        cli.main(["train", "--kind", "oicsr", "--method-options", text])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_study_options_per_method(tmp_path, capsys, monkeypatch):
    import fastsparse.workflow.run as runs

    seen = []
    original = runs.make_sparsity

    def spy(model, x, config):
        seen.append((config.kind, dict(config.method_options)))
        return original(model, x, config)

    monkeypatch.setattr(runs, "make_sparsity", spy)
    status = cli.main(
        ["study", "--out", str(tmp_path / "s"), "--kinds", "oicsr,selective_decay,l1",
         "--method-options", 'selective_decay={"final_sparsity": 0.5, "rounds": 1}',
         "--method-options", '{"backend": "torch"}', "--strengths", "1e-3",
         "--thresholds", "0.05", "--no-baseline", "--no-progress", "--inference-repeats", "1",
         "--epochs", "1", "--train-samples", "64", "--test-samples", "32"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    options = dict(seen)  # what each run's penalty or method was built with
    assert options["oicsr"] == {"backend": "torch"}
    assert options["selective_decay"] == {"final_sparsity": 0.5, "rounds": 1, "backend": "torch"}
    assert options["l1"] == {}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method-options", 'oicsr2={"a": 1}'], "unknown method 'oicsr2'"),
        (["--method-options", "slimming=[1]"], "must be a JSON object"),
        (["--inference-repeats", "0"], "--inference-repeats must be >= 1"),
    ],
)
def test_study_option_errors(argv, message, tmp_path, capsys):
    status = cli.main(["study", "--kinds", "slimming", "--out", str(tmp_path / "o"), *argv])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
