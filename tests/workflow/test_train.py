"""The training workflow (fastsparse.workflow.loop, .run, .timing): schedules, the progress bar,
train/evaluate through the step protocol (a penalty on either path, a method, a Sparsifier), runs,
the regularizer cost, and the sparsity methods inside a run.

Runs are tiny (one epoch on a few hundred images) and use the oracle backend, so they take
seconds and do not depend on which fused backends this machine has. The methods' runs check the
wiring (the method's loss and step hooks run, its hooks are removed, its own pruning rule is
used), not what the methods achieve.
"""

import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from fastsparse import backends
from fastsparse.core.step import StepHooks
from fastsparse.methods import METHODS, Method, Regularizer
from fastsparse.optim import Rule, Sparsifier
from fastsparse.workflow.config import ConfigError, RunConfig
from fastsparse.workflow.loop import AutogradPenalty, scheduled_strength, train
from fastsparse.workflow.models import LeNet5
from fastsparse.workflow.run import (
    load_data,
    make_method,
    make_regularizer,
    make_sparsity,
    run,
)
from fastsparse.workflow.timing import ProgressBar, best_fused_backend, regularizer_cost
from tests.helpers import TINY_RUN as TINY

X = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def data():
    return load_data(TINY)


def _model_and_reg(config, seed=0):
    """LeNet-5 and the config's penalty on the config's path (AutogradPenalty or Regularizer)."""
    torch.manual_seed(seed)
    model = LeNet5()
    return model, make_sparsity(model, X, config)


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
    for mode, path in (("autograd", AutogradPenalty), ("inplace", Regularizer)):
        config = dataclasses.replace(TINY, mode=mode, schedule="constant")
        model, reg = _model_and_reg(config)
        assert type(reg) is path
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


# --------------------------------------------------------------------------- the methods in a run


METHOD_TINY = dict(
    epochs=1, train_samples=96, test_samples=64, batch_size=32, backend="torch", device="cpu"
)


# the smallest model of the zoo on which every method applies (BatchNorm, same-shape features)
MODEL_OF = {"oicsr": "lenet5", "selective_decay": "lenet5", "slimming": "vgg11_bn"}
MODEL_OF["feature_flow"] = "vgg11_bn"


@pytest.fixture(scope="module")
def method_data():
    return load_data(RunConfig(**METHOD_TINY))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("method", METHODS)
def test_run_with_each_method(method, method_data, monkeypatch):
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

    monkeypatch.setattr("fastsparse.workflow.run.make_method", spy)
    config = RunConfig(kind=method, model=MODEL_OF[method], strength=1e-3, **METHOD_TINY)
    result = run(config, data=method_data, progress=False, inference_repeats=1)
    steps = 3  # 96 images, batches of 32
    assert calls.count("loss") == calls.count("before_step") == calls.count("after_step") == steps
    assert calls.count("end_epoch") == 1 and calls[-1] == "close"
    assert _hooks(result.model) == 0  # the method's hooks are gone before pruning
    row = result.summary()
    assert row["kind"] == method and row["strength"] == 1e-3
    assert "penalty" in result.train.epochs[0] and result.train.regularizer_seconds > 0
    x = method_data.test_images[:4]
    with torch.no_grad():
        result.prune.thresholded.eval(), result.pruned.eval()
        torch.testing.assert_close(result.pruned(x), result.prune.thresholded(x), atol=1e-5, rtol=0)


def test_method_options_and_inplace_reach_the_method(method_data):
    model = LeNet5()
    x = method_data.test_images[:1]
    config = RunConfig(
        kind="selective_decay", method_options={"final_sparsity": 0.5}, **METHOD_TINY
    )
    assert make_method(model, x, config).pruner is not None
    config = RunConfig(kind="oicsr", mode="inplace", **METHOD_TINY)
    method = make_method(model, x, config)
    assert method.inplace and float(method.loss()) == 0.0
    assert make_method(model, x, RunConfig(kind="l1", **METHOD_TINY)) is None


@pytest.mark.parametrize(
    "kind, model, options, message",
    [
        ("feature_flow", "lenet5", {}, "on model 'lenet5'"),
        ("slimming", "lenet5", {}, "no affine BatchNorm"),
        ("oicsr", "lenet5", {"bogus": 1}, "bogus"),
    ],
)
def test_a_method_that_cannot_apply_fails_before_training(
    kind, model, options, message, method_data
):
    config = RunConfig(kind=kind, model=model, method_options=options, **METHOD_TINY)
    with pytest.raises(ConfigError, match=message):
        make_method(LeNet5(), method_data.test_images[:1], config)


# --------------------------------------------------------------------------- the step protocol


def test_the_sparsity_objects_share_one_step_protocol():
    for cls in (Regularizer, Method, Sparsifier, AutogradPenalty):
        assert issubclass(cls, StepHooks), cls
    model = nn.Linear(8, 4)
    sparsifier = Sparsifier(model, [Rule(prox="l1")], torch.optim.SGD(model.parameters(), lr=0.1))
    sparsifier.end_epoch(metric=0.5)  # the protocol's calls, the inherited ones included
    sparsifier.close()


def test_a_sparsifier_trains_through_the_same_loop(data):
    """train() drives a Sparsifier as it drives a penalty or a method: its rules act around every
    step of the run's optimizer (here a proximal group lasso, which zeroes filters)."""
    torch.manual_seed(0)
    model = LeNet5()
    config = dataclasses.replace(TINY, kind=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.resolved_lr, momentum=0.9)
    rule = Rule("features.0.weight", prox="group_lasso", strength=10.0)
    sparsifier = Sparsifier(model, [rule], optimizer, backend="torch")
    stats = train(model, data, config, sparsifier, optimizer=optimizer, progress=False)
    assert sparsifier.steps == stats.steps == 4
    assert sparsifier.sparsity()["features.0.weight"] > 0
    assert stats.backend == "torch" and stats.regularizer_seconds > 0
    assert "penalty" not in stats.epochs[0] and "strength" not in stats.epochs[0]


def test_resuming_a_method_run_is_refused(method_data):
    model = LeNet5()
    method = make_method(model, method_data.test_images[:1], RunConfig(kind="oicsr", **METHOD_TINY))
    with pytest.raises(ValueError, match="resuming a run of 'oicsr' is not supported"):
        train(model, method_data, RunConfig(**METHOD_TINY), method, resume={}, progress=False)


def test_a_run_without_sparsity_measures_no_regularizer(data):
    torch.manual_seed(0)
    stats = train(LeNet5(), data, dataclasses.replace(TINY, kind=None), None, progress=False)
    assert stats.regularizer_seconds == 0.0 and stats.backend == "" and stats.step_seconds > 0
