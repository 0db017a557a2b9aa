"""The methods of issue 8 in the training workflow and in `fastsparse study`.

Runs are tiny (one epoch on a hundred images, oracle backend): they check the wiring (the
method's loss and step hooks run, its hooks are removed, its own pruning rule is used, the CSV
has its rows), not what the methods achieve.
"""

import csv

import pytest
import torch
from torch import nn

from fastsparse.methods import METHODS
from fastsparse.pruning import coupled_groups
from fastsparse.reference import coupled_group_stats
from fastsparse.workflow import cli
from fastsparse.workflow.models import VGG, LeNet5
from fastsparse.workflow.train import (
    ConfigError,
    RunConfig,
    load_data,
    make_method,
    run,
    threshold_and_prune,
)

TINY = dict(
    epochs=1, train_samples=96, test_samples=64, batch_size=32, backend="torch", device="cpu"
)
# the smallest model of the zoo on which every method applies (BatchNorm, same-shape features)
MODEL_OF = {"oicsr": "lenet5", "selective_decay": "lenet5", "slimming": "vgg11_bn"}
MODEL_OF["feature_flow"] = "vgg11_bn"


@pytest.fixture(scope="module")
def data():
    return load_data(RunConfig(**TINY))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_run_with_each_method(method, data, monkeypatch):
    calls = []
    original = make_method

    def spy(model, x, config):
        built = original(model, x, config)
        for name in ("loss", "before_step", "after_step", "end_epoch", "close"):
            fn = getattr(built, name)

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                calls.append(_name)
                return _fn(*args, **kwargs)

            setattr(built, name, wrapped)
        return built

    monkeypatch.setattr("fastsparse.workflow.train.make_method", spy)
    config = RunConfig(kind=method, model=MODEL_OF[method], strength=1e-3, **TINY)
    result = run(config, data=data, progress=False, inference_repeats=1)
    steps = 3  # 96 images, batches of 32
    assert calls.count("loss") == calls.count("before_step") == calls.count("after_step") == steps
    assert calls.count("end_epoch") == 1 and calls[-1] == "close"
    assert _hooks(result.model) == 0  # the method's hooks are gone before pruning
    row = result.summary()
    assert row["kind"] == method and row["strength"] == 1e-3
    assert "penalty" in result.train.epochs[0] and result.train.regularizer_seconds > 0
    x = data.test_images[:4]
    with torch.no_grad():
        result.prune.thresholded.eval(), result.pruned.eval()
        torch.testing.assert_close(result.pruned(x), result.prune.thresholded(x), atol=1e-5, rtol=0)


def test_method_options_and_inplace_reach_the_method(data):
    model = LeNet5()
    x = data.test_images[:1]
    config = RunConfig(kind="selective_decay", method_options={"final_sparsity": 0.5}, **TINY)
    assert make_method(model, x, config).pruner is not None
    config = RunConfig(kind="oicsr", mode="inplace", **TINY)
    method = make_method(model, x, config)
    assert method.inplace and float(method.loss()) == 0.0
    assert make_method(model, x, RunConfig(kind="l1", **TINY)) is None


@pytest.mark.parametrize(
    "kind, model, options, message",
    [
        ("feature_flow", "lenet5", {}, "on model 'lenet5'"),
        ("slimming", "lenet5", {}, "no affine BatchNorm"),
        ("oicsr", "lenet5", {"bogus": 1}, "bogus"),
    ],
)
def test_a_method_that_cannot_apply_fails_before_training(kind, model, options, message, data):
    config = RunConfig(kind=kind, model=model, method_options=options, **TINY)
    with pytest.raises(ConfigError, match=message):
        make_method(LeNet5(), data.test_images[:1], config)


def test_method_options_are_for_methods_only():
    with pytest.raises(ConfigError, match="method_options apply to the methods only"):
        RunConfig(kind="l1", method_options={"inplace": True}).validate()
    with pytest.raises(ConfigError, match="methods: oicsr"):
        RunConfig(kind="oicsr2").validate()


# --------------------------------------------------------------------------- prune criteria


def _vgg_with_dead_scales():
    torch.manual_seed(0)
    model = VGG(((8,), (16,)), in_channels=1).eval()
    with torch.no_grad():
        model.features[1].weight[:3] = 0.0  # BatchNorm scales of 3 channels of conv 1
    return model


def test_bn_scale_criterion_removes_channels_with_zero_scale():
    model, x = _vgg_with_dead_scales(), torch.randn(2, 1, 8, 8)
    by_norm = threshold_and_prune(model, x, 0.05)
    by_scale = threshold_and_prune(model, x, 0.05, criterion="bn_scale")
    assert by_norm.kept["features.0"] == (8, 8)  # the conv's filters themselves are not small
    assert by_scale.kept["features.0"] == (5, 8)
    with torch.no_grad():  # lossless: the zero-scale channels output only their BN shift...
        torch.testing.assert_close(by_scale.pruned(x), by_scale.thresholded(x), atol=1e-5, rtol=0)
    assert by_scale.pruned.features[0].out_channels == 5


def test_group_norm_criterion_scores_the_whole_coupled_group():
    torch.manual_seed(0)
    model, x = LeNet5().eval(), torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        model.features[0].weight[:4] *= 1e-3  # four small conv1 filters; two of them (2, 3)
        model.features[0].bias[:4] *= 1e-3
        model.features[3].weight[:, 2:4] *= 1e-3  # also feed conv2 weakly, two do not
    result = threshold_and_prune(model, x, 0.01, criterion="group_norm")
    groups = coupled_groups(LeNet5(), x)
    assert groups[0].root == "features.0"
    assert result.kept["features.0"] == (18, 20)  # filters 2 and 3 go, 0 and 1 stay
    assert threshold_and_prune(model, x, 0.01).kept["features.0"] == (16, 20)
    norms = coupled_group_stats(coupled_groups(model, x)[0])[1].sqrt()
    assert norms[:2].min() > norms[2:4].max()


def test_unknown_criterion():
    with pytest.raises(ValueError, match="valid: filter_norm, bn_scale, group_norm"):
        threshold_and_prune(LeNet5(), torch.randn(1, 1, 28, 28), 0.1, criterion="energy")


# --------------------------------------------------------------------------- the study


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

    monkeypatch.setattr("fastsparse.workflow.train.train", no_training)
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
    import fastsparse.workflow.train as training

    seen = []
    original = training.make_method

    def spy(model, x, config):
        seen.append((config.kind, dict(config.method_options)))
        return original(model, x, config)

    monkeypatch.setattr(training, "make_method", spy)
    status = cli.main(
        ["study", "--out", str(tmp_path / "s"), "--kinds", "oicsr,selective_decay,l1",
         "--method-options", 'selective_decay={"final_sparsity": 0.5, "rounds": 1}',
         "--method-options", '{"backend": "torch"}', "--strengths", "1e-3",
         "--thresholds", "0.05", "--no-baseline", "--no-progress", "--inference-repeats", "1",
         "--epochs", "1", "--train-samples", "64", "--test-samples", "32"]
    )  # fmt: skip
    assert status == 0, capsys.readouterr().err
    options = dict(seen)  # check_method's calls, then the runs': the same options
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
