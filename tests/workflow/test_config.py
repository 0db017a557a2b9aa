"""The run configuration (fastsparse.workflow.config): every bad setting is a ConfigError with
a clear message, dict round trips, defaults (strength, learning rate per model)."""

import dataclasses

import pytest

from fastsparse.workflow.config import DEFAULT_STRENGTHS, ConfigError, RunConfig
from tests.helpers import TINY_RUN as TINY


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
    assert config.resolved_strength == DEFAULT_STRENGTHS["l1"]
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig(kind="none").resolved_strength == 0.0


def test_default_learning_rate_per_model():
    assert RunConfig().resolved_lr == 0.05  # LeNet-5: what the demo and studies used
    assert RunConfig(model="vgg11_bn").resolved_lr == 0.01  # 0.05 diverges there
    assert RunConfig(model="vgg11_bn", lr=0.2).resolved_lr == 0.2


def test_method_options_are_for_methods_only():
    with pytest.raises(ConfigError, match="method_options apply to the methods only"):
        RunConfig(kind="l1", method_options={"inplace": True}).validate()
    with pytest.raises(ConfigError, match="methods: oicsr"):
        RunConfig(kind="oicsr2").validate()
