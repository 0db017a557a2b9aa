"""One whole run, the workflow behind ``fastsparse demo/train/study`` (:func:`run`)::

    data  = load_data(config)                          # bundled MNIST subset by default
    model = build_model(config, data)                  # LeNet-5 by default
    hooks = make_sparsity(model, x, config)            # the penalty or the method of the run
    train(model, data, config, hooks)                  # SGD, strength warm-up, optional AMP
    result = threshold_and_prune(model, x, threshold)  # zero weak filters' coupled groups, prune

Thresholding rule: a filter (one output row of a prunable conv or linear layer) is *weak* when the
l2 norm of its weights is <= ``threshold`` times the largest filter norm of its layer
(``threshold_mode="relative"``, the default, comparable across penalties of any scale) or <=
``threshold`` (``"absolute"``). The whole coupled group of a weak filter (its weights and bias,
the next layer's input slice, a following BatchNorm) is set to zero, and
:func:`fastsparse.prune` then removes the zero groups; the pruned model computes exactly what the
thresholded model computes, so its accuracy is the accuracy after thresholding.

Example::

    >>> from fastsparse.workflow.config import RunConfig
    >>> from fastsparse.workflow.run import run
    >>> result = run(RunConfig(kind="group_l1l2", epochs=1, train_samples=256))  # doctest: +SKIP
    >>> result.accuracy_after, result.report.macs_after                         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, TextIO

import torch
from torch import nn

from fastsparse.core.groups import default_parameters
from fastsparse.core.step import StepHooks
from fastsparse.methods import build_method
from fastsparse.methods.regularizer import Regularizer
from fastsparse.pruning.common import unwrap
from fastsparse.pruning.threshold import PruneResult, prunable_weights, threshold_and_prune
from fastsparse.workflow.config import ConfigError, RunConfig
from fastsparse.workflow.datasets import Dataset, load_dataset
from fastsparse.workflow.loop import AutogradPenalty, TrainStats, evaluate, train
from fastsparse.workflow.models import get_model
from fastsparse.workflow.timing import measure_inference_pair

__all__ = [
    "RunResult",
    "build_model",
    "check_method",
    "load_data",
    "make_method",
    "make_regularizer",
    "make_sparsity",
    "resolve_device",
    "run",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and CUDA)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_regularizer(
    model: nn.Module,
    example_inputs: Any,
    kind: str,
    strength: float,
    *,
    groups: Any = "filters",
    regularize: str = "prunable",
    backend: str = "auto",
    alpha: Optional[float] = None,
):
    """A :class:`fastsparse.Regularizer` over the prunable layers' weights (or all of them).

    The classifier is left out by default: a group penalty across its rows would push whole
    classes to zero, and its outputs cannot be pruned anyway.
    """
    if regularize == "prunable":
        params = [w for _, w in prunable_weights(model, example_inputs)]
    else:
        params = default_parameters(unwrap(model), include_output=True)
    options = {} if alpha is None else {"alpha": alpha}
    return Regularizer(params, kind, strength, groups=groups, backend=backend, **options)


# Methods whose builders take inplace=True (the in-place gradient instead of a loss term).
_INPLACE_METHODS = ("oicsr", "slimming")


def make_method(model: nn.Module, example_inputs: Any, config: RunConfig):
    """The config's method (:func:`fastsparse.methods.build_method`), or None for a penalty.

    The config's backend, and ``mode == "inplace"`` for the methods that have it, are passed
    on unless ``config.method_options`` sets them. A method that cannot apply to the model
    (feature flow without same-shape feature maps, slimming without BatchNorm) raises
    :class:`ConfigError` naming the model.
    """
    if config.method is None:
        return None
    options = {"backend": config.backend, **config.method_options}
    if config.method in _INPLACE_METHODS and config.mode == "inplace":
        options.setdefault("inplace", True)
    try:
        return build_method(
            config.method, model, example_inputs, config.resolved_strength, **options
        )
    except TypeError as e:  # an option the method does not take
        raise ConfigError(f"method {config.method!r}: {e}") from e
    except ValueError as e:
        raise ConfigError(f"method {config.method!r} on model {config.model!r}: {e}") from e


def make_sparsity(model: nn.Module, example_inputs: Any, config: RunConfig) -> Optional[StepHooks]:
    """The step hooks (`fastsparse.core.step.StepHooks`) of the config's run, for `train`: its
    penalty (a Regularizer: in place with ``mode == "inplace"``, else an `AutogradPenalty`), its
    method (:func:`make_method`), or None.

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> hooks = make_sparsity(LeNet5(), torch.zeros(1, 1, 28, 28), RunConfig(kind="l1"))
        >>> type(hooks).__name__, hooks.strength
        ('AutogradPenalty', 0.001)
    """
    if config.penalty_kind is None:
        return make_method(model, example_inputs, config)
    reg = make_regularizer(
        model,
        example_inputs,
        config.penalty_kind,
        config.resolved_strength,
        groups=config.groups,
        regularize=config.regularize,
        backend=config.backend,
        alpha=config.alpha,
    )
    return reg if config.mode == "inplace" else AutogradPenalty(reg)


def check_method(config: RunConfig, data: Dataset) -> None:
    """Raise ConfigError now if the config's method cannot run on its model (cheap, no data)."""
    if config.method is None:
        return
    model = build_model(config, data)
    method = make_method(model, data.test_images[:1], config)
    method.close()


@dataclass
class RunResult:
    """Everything :func:`run` measured, and the models it made."""

    config: RunConfig
    model: nn.Module
    pruned: nn.Module
    prune: PruneResult
    train: TrainStats
    accuracy_before: float
    accuracy_after: float
    inference_before: float
    inference_after: float
    device: str
    timing_spread: float = 1.0  # p80/p20 of the repeated timings (> ~1.2: a busy machine)

    @property
    def report(self):
        """The sparsity report (filters, parameters, MACs before and after)."""
        return self.prune.report

    def summary(self) -> Dict[str, Any]:
        """One flat row of numbers (the study's CSV row)."""
        report = self.report
        conv = [layer for layer in report.layers if "Conv" in layer.type and layer.prunable]
        conv_total = sum(layer.filters for layer in conv)
        conv_after = sum(layer.filters_after for layer in conv)
        row = {
            "kind": self.config.kind if self.config.regularized else "none",
            "strength": self.config.resolved_strength,
            "threshold": self.config.threshold,
            "accuracy_before": round(100 * self.accuracy_before, 2),
            "accuracy_after": round(100 * self.accuracy_after, 2),
            "conv_filters_removed_pct": round(100 * (1 - conv_after / conv_total), 2)
            if conv_total
            else 0.0,
            "params_removed_pct": round(100 * (1 - report.params_after / report.params), 2),
            "flops_removed_pct": round(100 * (1 - report.macs_after / report.macs), 2),
            "params_after": report.params_after,
            "macs_after": report.macs_after,
        }
        for name, (kept, total) in self.prune.kept.items():
            row[f"kept[{name}]"] = f"{kept}/{total}"
        row.update(
            {
                "inference_ms_before": round(1000 * self.inference_before, 2),
                "inference_ms_after": round(1000 * self.inference_after, 2),
                "timing_spread": round(self.timing_spread, 3),
                "train_seconds": round(self.train.seconds, 1),
                "step_ms": round(1000 * self.train.step_seconds, 3),
                "regularizer_ms": round(1000 * self.train.regularizer_seconds, 3),
                "regularizer_share_pct": round(100 * self.train.regularizer_share, 2),
                "backend": self.train.backend,
            }
        )
        return row


def load_data(config: RunConfig) -> Dataset:
    """The config's data set (ConfigError for a missing or corrupt one), test split limited."""
    try:
        data = load_dataset(config.dataset, config.data_dir, normalize=config.normalize)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    if config.test_samples is not None:
        data = dataclasses.replace(
            data,
            test_images=data.test_images[: config.test_samples],
            test_labels=data.test_labels[: config.test_samples],
        )
    return data


def build_model(config: RunConfig, data: Dataset) -> nn.Module:
    """A freshly initialized model for the data set (seeded by the caller)."""
    kwargs = {}
    if config.model == "lenet5":
        kwargs["image_size"] = data.image_shape[-1]
    return get_model(config.model, data.num_classes, in_channels=data.in_channels, **kwargs)


def run(
    config: RunConfig,
    *,
    data: Optional[Dataset] = None,
    progress: bool = True,
    stream: Optional[TextIO] = None,
    on_epoch_end: Optional[Callable] = None,
    inference_repeats: int = 10,
    checkpoint: Optional[Callable[[dict], None]] = None,
    checkpoint_every: Optional[int] = None,
    resume: Optional[dict] = None,
) -> RunResult:
    """Validate, load, build, train, evaluate, threshold, prune and measure: one whole run.

    Args:
        config: the settings (validated first: errors come before anything is loaded).
        data: an already loaded data set (the study loads it once), else ``load_data(config)``.
        progress, stream, on_epoch_end, checkpoint, checkpoint_every, resume: passed to
            :func:`train` (a resumed run is rebuilt from the same config and seed first).
        inference_repeats: timing repetitions of the inference measurement.
    """
    config.validate()
    if data is None:
        data = load_data(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model = build_model(config, data).to(device)
    example = data.test_images[:1].to(device)
    sparsity = make_sparsity(model, example, config)
    trained = model
    if config.compile:
        backend = config.compile if isinstance(config.compile, str) else "inductor"
        trained = torch.compile(model, backend=backend)
    try:
        stats = train(
            trained,
            data,
            config,
            sparsity,
            progress=progress,
            stream=stream,
            on_epoch_end=on_epoch_end,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
    finally:
        if sparsity is not None:
            sparsity.close()  # hooks off before the model is copied, thresholded and pruned
    accuracy_before = evaluate(model, data.test_images, data.test_labels)
    result = threshold_and_prune(
        model, example, config.threshold, config.threshold_mode, config.prune_criterion
    )
    accuracy_after = evaluate(result.pruned, data.test_images, data.test_labels)
    bench_images = data.test_images[:2000]
    before, after, timing_spread = measure_inference_pair(
        model, result.pruned, bench_images, repeats=inference_repeats
    )
    return RunResult(
        config=config,
        model=model,
        pruned=result.pruned,
        prune=result,
        train=stats,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        inference_before=before,
        inference_after=after,
        timing_spread=max(timing_spread, stats.step_spread),
        device=str(device),
    )
