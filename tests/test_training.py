"""The training workflow: schedules, train/evaluate, threshold + prune, timing helpers.

Runs are tiny (one epoch on a few hundred images) and use the oracle backend, so they take
seconds and do not depend on which fused backends this machine has.
"""

import dataclasses
import io
import math

import pytest
import torch

from fastsparse.core import backends
from fastsparse.workflow import train as training
from fastsparse.workflow.models import LeNet5
from fastsparse.workflow.train import (
    ConfigError,
    ProgressBar,
    RunConfig,
    best_fused_backend,
    load_data,
    make_regularizer,
    regularizer_cost,
    run,
    scheduled_strength,
    threshold_and_prune,
    train,
)

TINY = RunConfig(
    kind="group_l1l2",
    strength=0.3,
    epochs=1,
    train_samples=256,
    test_samples=128,
    batch_size=64,
    backend="torch",
    device="cpu",
)
X = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def data():
    return load_data(TINY)


def _model_and_reg(config, seed=0):
    torch.manual_seed(seed)
    model = LeNet5()
    reg = make_regularizer(
        model, X, config.kind, config.strength, groups=config.groups, backend=config.backend
    )
    return model, reg


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    "schedule, progress, expected",
    [
        ("constant", 0.0, 1.0),
        ("linear", 0.0, 0.0),
        ("linear", 0.1, 0.5),
        ("linear", 0.5, 1.0),
        ("cosine", 0.1, 0.5),
        ("cosine", 0.05, 0.5 * (1 - math.cos(math.pi / 4))),
        ("cosine", 0.9, 1.0),
    ],
)
def test_scheduled_strength(schedule, progress, expected):
    assert scheduled_strength(1.0, schedule, progress, warmup=0.2) == pytest.approx(expected)


def test_scheduled_strength_without_warmup_is_constant():
    assert scheduled_strength(2.0, "linear", 0.0, warmup=0.0) == 2.0


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        scheduled_strength(1.0, "step", 0.5, 0.1)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kind="l3"), "unknown kind 'l3'"),
        (dict(model="lenet6"), "unknown model"),
        (dict(dataset="mnist", data_dir="/no/such/dir"), "does not exist"),
        (dict(dataset="cifar10"), "needs data_dir"),
        (dict(data_dir="/tmp"), "takes no data_dir"),
        (dict(epochs=0), "epochs must be >= 1"),
        (dict(epochs=1.5), "epochs must be an integer"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(strength=-1.0), "strength must be >= 0"),
        (dict(threshold=1.5), "relative threshold must be < 1"),
        (dict(schedule="step"), "unknown schedule"),
        (dict(mode="fused"), "unknown mode"),
        (dict(groups="rows"), "bad groups"),
        (dict(alpha=0.3), "sparse_group_lasso"),
        (dict(amp="yes"), "amp must be true or false"),
        (dict(warmup=2.0), "warmup is a fraction"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **change).validate()


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown setting.*epoch\\b"):
        RunConfig.from_dict({"epoch": 3})


def test_config_defaults_and_round_trip():
    config = RunConfig.from_dict({"kind": "l1", "groups": ["filters", "channels"]})
    assert config.groups == ("filters", "channels")
    assert config.resolved_strength == training.DEFAULT_STRENGTHS["l1"]
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig(kind="none").resolved_strength == 0.0


# --------------------------------------------------------------------------- progress bar


def test_progress_bar_writes_one_line_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(10, "epoch 1/1", stream)
    for _ in range(10):
        bar.update(1, "loss 0.5")
    bar.close("done")
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert "[########################] 10/10" in text and text.rstrip().endswith("done")


# --------------------------------------------------------------------------- training


def test_train_learns_and_measures(data):
    model, reg = _model_and_reg(TINY)
    stats = train(model, data, TINY, reg, progress=False)
    assert stats.steps == 4
    assert len(stats.epochs) == 1 and stats.epochs[0]["loss"] < 2.3
    assert stats.epochs[0]["strength"] == TINY.strength  # the last step is past the warm-up
    assert reg.strength == TINY.strength  # restored after the schedule
    assert 0 < stats.regularizer_seconds < stats.step_seconds
    assert 0 < stats.regularizer_share < 1
    assert stats.backend == "torch"


def test_autograd_and_inplace_paths_agree(data):
    weights = []
    for mode in ("autograd", "inplace"):
        config = dataclasses.replace(TINY, mode=mode, schedule="constant")
        model, reg = _model_and_reg(config)
        train(model, data, config, reg, progress=False)
        weights.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_runs_are_reproducible(data):
    results = [run(TINY, data=data, progress=False, inference_repeats=1) for _ in range(2)]
    for a, b in zip(results[0].model.parameters(), results[1].model.parameters()):
        assert torch.equal(a, b)
    assert results[0].accuracy_after == results[1].accuracy_after


def test_amp_on_cpu(data):
    config = dataclasses.replace(TINY, amp=True, mode="inplace")
    model, reg = _model_and_reg(config)
    stats = train(model, data, config, reg, progress=False)
    assert math.isfinite(stats.epochs[0]["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compiled_model(data):
    config = dataclasses.replace(TINY, compile="eager")
    result = run(config, data=data, progress=False, inference_repeats=1)
    assert math.isfinite(result.train.epochs[0]["loss"])
    assert not hasattr(result.pruned, "_orig_mod")


def test_progress_bars_go_to_the_stream(data):
    stream = io.StringIO()
    model, reg = _model_and_reg(TINY)
    train(model, data, dataclasses.replace(TINY, epochs=2), reg, stream=stream)
    lines = stream.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "penalty" in lines[-1]


def test_run_summary(data):
    result = run(TINY, data=data, progress=False, inference_repeats=1)
    row = result.summary()
    assert row["kind"] == "group_l1l2" and row["strength"] == 0.3
    assert set(row) >= {"kept[features.0]", "kept[features.3]", "kept[classifier.0]"}
    assert 0 <= row["accuracy_after"] <= 100 and row["params_after"] <= 431080
    assert result.inference_before > 0 and result.inference_after > 0


# --------------------------------------------------------------------------- threshold + prune


def _lenet_with_weak_filters():
    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        model.features[0].weight[:5] *= 1e-3  # 5 weak conv1 filters
        model.features[3].weight[:10] *= 0.04  # 10 weak conv2 filters
    return model


def test_threshold_and_prune_relative():
    model = _lenet_with_weak_filters()
    before = [p.clone() for p in model.parameters()]
    result = threshold_and_prune(model, X, 0.05)
    assert result.kept == {
        "features.0": (15, 20),
        "features.3": (40, 50),
        "classifier.0": (500, 500),
    }
    assert result.pruned.features[0].out_channels == 15
    assert result.pruned.features[3].in_channels == 15
    assert result.pruned.features[3].out_channels == 40
    assert result.report.params_after == sum(p.numel() for p in result.pruned.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # untouched
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(result.pruned(x), result.thresholded(x), atol=1e-5, rtol=0)
        # The weak filters' coupled groups are zero: filter, bias, next layer's input slice.
        assert result.thresholded.features[0].weight[:5].abs().sum() == 0
        assert result.thresholded.features[0].bias[:5].abs().sum() == 0
        assert result.thresholded.features[3].weight[:, :5].abs().sum() == 0


def test_threshold_absolute_keeps_the_strongest_filter():
    model = _lenet_with_weak_filters()
    result = threshold_and_prune(model, X, 1e6, mode="absolute")
    assert result.kept == {"features.0": (1, 20), "features.3": (1, 50), "classifier.0": (1, 500)}


def test_threshold_zero_removes_nothing():
    result = threshold_and_prune(_lenet_with_weak_filters(), X, 0.0)
    assert result.report.params_after == result.report.params


# --------------------------------------------------------------------------- backends, costs


def test_best_fused_backend_on_cpu():
    name, reason = best_fused_backend(torch.device("cpu"))
    # Triton's CPU interpreter (on in these tests) never counts: it is for tests only.
    assert name in (None, "native")
    assert (name is None) == bool(reason)


def test_best_fused_backend_without_native(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", ("auto", "triton", "torch"))
    assert best_fused_backend(torch.device("cpu")) == (
        None,
        "this fastsparse has no 'native' backend",
    )


@pytest.mark.parametrize("mode", ["autograd", "inplace"])
def test_regularizer_cost_restores_grads(mode):
    model = LeNet5()
    params = [model.features[0].weight, model.features[3].weight]
    params[0].grad = torch.ones_like(params[0])
    seconds = regularizer_cost(params, "l1l2", backend="torch", mode=mode, repeats=3, warmup=1)
    assert seconds > 0
    assert torch.equal(params[0].grad, torch.ones_like(params[0])) and params[1].grad is None


def test_regularizer_leaves_out_the_classifier():
    model = LeNet5()
    reg = make_regularizer(model, X, "l1", 1e-4)
    assert [tuple(p.shape) for p in reg.params] == [(20, 1, 5, 5), (50, 20, 5, 5), (500, 800)]
    reg_all = make_regularizer(model, X, "l1", 1e-4, regularize="all")
    assert len(reg_all.params) == 4


def test_default_learning_rate_per_model():
    assert RunConfig().resolved_lr == 0.05  # LeNet-5: what the demo and studies used
    assert RunConfig(model="vgg11_bn").resolved_lr == 0.01  # 0.05 diverges there
    assert RunConfig(model="vgg11_bn", lr=0.2).resolved_lr == 0.2
