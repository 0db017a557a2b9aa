"""The ``fastsparse`` command (also ``python -m fastsparse``).

Commands:

- ``fastsparse demo``: sparse training of LeNet-5 on the bundled MNIST subset, then thresholding
  and pruning, with a before/after table (a few minutes on a laptop CPU).
- ``fastsparse study``: the trade-off sweep over penalties and strengths (CSV, plot, table).
- ``fastsparse train``: your own run, from flags or a JSON/TOML config file; saves checkpoints,
  the trained and the pruned model.
- ``fastsparse bench``: the benchmark harness of a source checkout (fastsparse/workflow/bench.py
  finds it); its arguments are passed through.

Bad settings (unknown kind, missing data directory, malformed config) are reported in one line
on stderr with exit status 2, before anything is trained.

This module parses the command line and runs the commands; config files are read in config.py,
what the commands print is composed in reports.py, checkpoint files are written and read in
checkpoints.py, and the runs themselves are run.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fastsparse.core.contract import KINDS
from fastsparse.methods import METHODS
from fastsparse.workflow import bench, checkpoints
from fastsparse.workflow.config import ConfigError, RunConfig, load_config_file, parse_groups
from fastsparse.workflow.reports import print_demo, pruning_report
from fastsparse.workflow.run import load_data, resolve_device, run
from fastsparse.workflow.study import STUDY_EPOCHS, STUDY_THRESHOLDS, run_study

PROG = "fastsparse"

# The demo: LeNet-5 on the bundled subset with the l1/l2 ratio across filters (group_l1l2, which
# removes filters; the per-filter l1l2 does not, see results/study-lenet5), 10 epochs.
DEMO_CONFIG = RunConfig(kind="group_l1l2", strength=0.05, epochs=10, threshold=0.05)


class UsageError(Exception):
    """A bad command line or setting: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- parsing helpers


def _floats(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"expected comma-separated numbers, got {text!r}") from None


def _parse_method_options(specs: Optional[List[str]], kinds: List[str]) -> Dict[str, dict]:
    """``['{"a": 1}']`` (every method of the sweep) or ``['slimming={"ratio": 0.3}']``."""
    result: Dict[str, dict] = {}
    for spec in specs or []:
        head, sep, tail = spec.partition("=")
        if sep and head.strip() in METHODS:
            targets, text = [head.strip()], tail
        elif sep and not spec.lstrip().startswith("{"):
            raise UsageError(f"--method-options: unknown method {head.strip()!r} in {spec!r}")
        else:
            targets, text = [k for k in kinds if k in METHODS], spec
        try:
            options = _json_table(text, "--method-options")
        except argparse.ArgumentTypeError as e:
            raise UsageError(str(e)) from None
        for target in targets:
            result.setdefault(target, {}).update(options)
    return result


def _parse_strengths(specs: Optional[List[str]], kinds: List[str]) -> Dict[str, List[float]]:
    """``["1e-3,1e-2"]`` (every kind) or ``["l1=1e-4,1e-3", "l2=0.01"]`` → kind -> strengths."""
    result: Dict[str, List[float]] = {}
    for spec in specs or []:
        if "=" in spec:
            kind, _, values = spec.partition("=")
            result[kind.strip()] = _floats(values)
        else:
            for kind in kinds:
                result[kind] = _floats(spec)
    return result


def _json_table(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {text!r}")
    return value


# Flags shared by demo and train, mapped onto RunConfig fields (None: not given).
_RUN_FLAGS = {
    "model": dict(help="model name (lenet5, vgg16_bn, resnet56, ...)"),
    "dataset": dict(help="mnist_subset (bundled), mnist or cifar10"),
    "data_dir": dict(help="folder with the data set's files (mnist, cifar10)"),
    "kind": dict(
        help="penalty: l1, l2, group_lasso, l1l2, group_l1l2, hoyer_square, "
        "group_hoyer_square, sparse_group_lasso; method: oicsr, feature_flow, "
        "selective_decay, slimming; or none"
    ),
    "strength": dict(type=float, help="penalty multiplier (default: a per-kind value)"),
    "groups": dict(type=parse_groups, help="filters | channels | kernels | none, or a comma list"),
    "alpha": dict(type=float, help="sparse_group_lasso's l1 share (default 0.5)"),
    "method_options": dict(
        type=lambda text: _json_table(text, "--method-options"),
        help="a method's options as JSON, e.g. '{\"final_sparsity\": 0.5}' (methods only)",
    ),
    "regularize": dict(help="prunable (default: all conv/linear but the classifier) or all"),
    "schedule": dict(help="strength warm-up: constant, linear or cosine"),
    "warmup": dict(type=float, help="fraction of training over which the strength ramps up"),
    "mode": dict(help="autograd (loss + reg()) or inplace (reg.apply_() after backward)"),
    "backend": dict(help="penalty backend: auto, triton, native, cuda or torch"),
    "epochs": dict(type=int, help="training epochs"),
    "batch_size": dict(type=int, help="batch size"),
    "lr": dict(type=float, help="SGD learning rate (default 0.05 for lenet5, 0.01 for the others)"),
    "momentum": dict(type=float, help="SGD momentum"),
    "weight_decay": dict(type=float, help="SGD weight decay"),
    "lr_schedule": dict(help="cosine or constant"),
    "threshold": dict(
        type=float,
        help="filters with norm <= threshold (x the layer's largest "
        "filter norm, in relative mode) are removed",
    ),
    "threshold_mode": dict(
        help="relative (default: x each layer's largest score), global (x the largest of all "
        "layers) or absolute"
    ),
    "train_samples": dict(type=int, help="use only the first N training images"),
    "test_samples": dict(type=int, help="use only the first N test images"),
    "seed": dict(type=int, help="random seed"),
    "device": dict(help="auto, cpu or cuda"),
}


def _add_run_flags(parser: argparse.ArgumentParser, skip: tuple = ()) -> None:
    for name, kwargs in _RUN_FLAGS.items():
        if name in skip:
            continue
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)
    parser.add_argument("--amp", action="store_true", default=None, help="mixed precision")
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=None,
        metavar="BACKEND",
        help="torch.compile the model (optionally naming the compile backend)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice; 1 is fastest on a busy machine)",
    )


def output_folder(path: str, flag: str = "--out") -> Path:
    """The output folder, created if needed; UsageError if it is a file or cannot be written."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fastsparse-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written: {e.strerror or e}") from None
    return folder


def _config_from_args(args: argparse.Namespace, base: RunConfig) -> RunConfig:
    """Flags over the config file (train --config) over `base`; validated. Sets --threads."""
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    values = base.to_dict()
    source = ""
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
        source = f"config file {args.config}"
    given = {name: getattr(args, name, None) for name in [*_RUN_FLAGS, "amp", "compile"]}
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("kind") == "none":
        given["kind"] = None
    values.update(given)
    return RunConfig.from_dict(values, source=source)


# --------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """fastsparse demo."""
    start = time.perf_counter()
    config = _config_from_args(args, DEMO_CONFIG)
    if config.penalty_kind is None:
        raise UsageError(
            "the demo compares the fused and eager penalty backends: give a penalty --kind "
            "(methods run with fastsparse train and study)"
        )
    data = load_data(config)
    device = resolve_device(config.device)
    where = (
        f"{torch.cuda.get_device_name(device)}"
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    n_train = config.train_samples or len(data.train_labels)
    print(
        f"fastsparse demo: {config.model} on {data.name} ({min(n_train, len(data.train_labels)):,}"
        f" train / {len(data.test_labels):,} test images), {where}"
    )
    print(
        f"regularizer: {config.penalty_kind} on {config.groups}, strength "
        f"{config.resolved_strength:g} ({config.schedule} warm-up over "
        f"{100 * config.warmup:.0f}% of training), {config.mode} path; "
        f"{config.epochs} epochs of SGD (lr {config.resolved_lr:g}, {config.lr_schedule})"
    )
    result = run(config, data=data, progress=not args.no_progress)
    print_demo(result, data)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


# --------------------------------------------------------------------------- train


# The flags a resumed run still takes: the rest of its settings are the checkpoint's.
_RESUME_FLAGS = ("resume", "checkpoint_every", "no_progress", "threads")


def _resume_state(args: argparse.Namespace) -> tuple:
    """(config, output folder, state) of `fastsparse train --resume DIR`."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in [*_RUN_FLAGS, "amp", "compile", "config"]
        if name not in _RESUME_FLAGS and getattr(args, name, None) not in (None, False)
    ]
    if given:
        raise UsageError(
            f"{given[0]} cannot be combined with --resume: a resumed run keeps its settings"
        )
    out = Path(args.resume).expanduser()
    path = out / checkpoints.CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"--resume {args.resume}: no {checkpoints.CHECKPOINT_NAME} there")
    try:
        config, state = checkpoints.load_checkpoint(path)
    except (KeyError, RuntimeError, EOFError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise UsageError(f"--resume {args.resume}: cannot read {path} ({e})") from None
    return config, output_folder(args.resume, "--resume"), state


def cmd_train(args: argparse.Namespace) -> int:
    """fastsparse train."""
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    resume = None
    if args.resume:
        config, out, resume = _resume_state(args)
        if config.method is not None:
            raise UsageError(f"resuming a run of method {config.method!r} is not supported")
    else:
        config = _config_from_args(args, RunConfig())
        out = output_folder(args.out)
    data = load_data(config)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    last = out / checkpoints.CHECKPOINT_NAME

    def checkpoint(state):
        checkpoints.save_atomically(state, last)

    print(
        f"training {config.model} on {data.name} with "
        f"{config.kind if config.regularized else 'no'} regularizer → {out}"
    )
    try:
        result = run(
            config,
            data=data,
            progress=not args.no_progress,
            checkpoint=checkpoint,
            checkpoint_every=args.checkpoint_every,
            resume=resume,
        )
    except KeyboardInterrupt:
        where = (
            f"last checkpoint: {last}; continue with `fastsparse train --resume {out}`"
            if last.exists()
            else "no checkpoint was written yet"
        )
        print(f"{PROG} train: interrupted; {where}", file=sys.stderr)
        return 130
    torch.save(result.model.state_dict(), out / "model.pt")
    torch.save(result.pruned.state_dict(), out / "pruned.pt")
    report = pruning_report(result)
    (out / "report.txt").write_text(report + "\n")
    metrics = {"summary": result.summary(), "epochs": result.train.epochs}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(report)
    s = result.summary()
    print(
        f"accuracy {s['accuracy_before']:.2f}% → {s['accuracy_after']:.2f}% after pruning; "
        f"{s['params_removed_pct']:.1f}% of parameters and {s['flops_removed_pct']:.1f}% of "
        f"FLOPs removed"
    )
    print(
        f"saved {out}/model.pt (trained), {out}/pruned.pt (pruned state dict: "
        f"fastsparse.pruning.load_pruned(get_model({config.model!r}), torch.load(path))), "
        f"checkpoint.pt, report.txt, metrics.json"
    )
    return 0


# --------------------------------------------------------------------------- study


def cmd_study(args: argparse.Namespace) -> int:
    """fastsparse study."""
    valid = f"valid kinds: {', '.join(KINDS)}; methods: {', '.join(METHODS)}"
    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else list(KINDS)
    bad = [k for k in kinds if k not in KINDS + METHODS]
    if bad:
        raise UsageError(f"unknown kind {bad[0]!r}; {valid}")
    strengths = _parse_strengths(args.strengths, kinds)
    bad = [k for k in strengths if k not in KINDS + METHODS]
    if bad:
        raise UsageError(f"unknown kind {bad[0]!r} in --strengths; {valid}")
    method_options = _parse_method_options(args.study_method_options, kinds)
    if args.inference_repeats < 1:
        raise UsageError(f"--inference-repeats must be >= 1, got {args.inference_repeats}")
    thresholds = _floats(args.thresholds) if args.thresholds else list(STUDY_THRESHOLDS)
    if not thresholds:
        raise UsageError("--thresholds needs at least one value")
    base = _config_from_args(args, dataclasses.replace(RunConfig(), kind=None))
    command = "fastsparse " + " ".join(shlex.quote(a) for a in args.argv)
    start = time.perf_counter()
    rows = run_study(
        output_folder(args.out),
        kinds=kinds,
        strengths=strengths,
        thresholds=thresholds,
        epochs=base.epochs if args.epochs is not None else STUDY_EPOCHS,
        base=base,
        baseline=not args.no_baseline,
        method_options=method_options,
        inference_repeats=args.inference_repeats,
        command=command,
        progress=not args.no_progress,
        resume=args.resume,
    )
    print(
        f"{len(rows)} rows in {(time.perf_counter() - start) / 60:.1f} min → {args.out}/"
        "results.csv, results.md, tradeoff.png, command.txt"
    )
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    """fastsparse bench [harness arguments...]: every argument goes to the harness."""
    status = bench.main(list(args.bench_args))
    return int(status or 0)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fastsparse`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Structured-sparsity training and filter pruning with fused kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train LeNet-5 sparse on the bundled MNIST subset, prune, show before/after",
        description="Sparse training of LeNet-5 on the bundled MNIST subset with the l1/l2 "
        "regularizer, then thresholding and pruning; prints a before/after table.",
    )
    _add_run_flags(demo)
    demo.set_defaults(func=cmd_demo)

    train = sub.add_parser(
        "train",
        help="your own run from flags or a JSON/TOML config file",
        description="Train with a sparsity regularizer, threshold, prune; save checkpoints, the "
        "trained model and the pruned model. Flags override the config file.",
    )
    train.add_argument("--config", help="JSON (.json) or TOML (.toml) file of settings")
    train.add_argument("--out", default="fastsparse-run", help="output directory")
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run whose output directory is DIR from its last checkpoint "
        "(its settings come from the checkpoint)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="also save a checkpoint every STEPS optimizer steps (default: every epoch only)",
    )
    _add_run_flags(train)
    train.set_defaults(func=cmd_train)

    study = sub.add_parser(
        "study",
        help="the trade-off sweep over penalties and strengths",
        description="Train, threshold and prune for every penalty kind and strength; write "
        "results.csv, tradeoff.png, results.md and command.txt.",
    )
    study.add_argument("--out", default="results/study", help="output directory")
    study.add_argument(
        "--kinds",
        help="comma-separated penalty kinds and methods (oicsr, feature_flow, selective_decay, "
        "slimming); default: the eight penalties",
    )
    study.add_argument(
        "--strengths",
        action="append",
        help="'1e-3,1e-2' for every kind or 'KIND=1e-3,1e-2' (repeatable); "
        "default: a grid per kind",
    )
    study.add_argument(
        "--thresholds", help="comma-separated thresholds (default 0.01,0.05,0.1,0.2,0.3)"
    )
    study.add_argument("--no-baseline", action="store_true", help="skip the unregularized run")
    study.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of an existing results.csv in --out and skip the runs it holds",
    )
    study.add_argument(
        "--method-options",
        dest="study_method_options",  # not RunConfig.method_options: one table per method
        action="append",
        help="options of the methods as JSON: '{...}' for every method of the sweep or "
        "'METHOD={...}' (repeatable)",
    )
    study.add_argument(
        "--inference-repeats",
        type=int,
        default=5,
        help="timing repetitions of each inference measurement (default 5)",
    )
    _add_run_flags(study, skip=("method_options",))
    for action in study._actions:  # the sweep sets kind, strength and threshold itself
        if action.dest in ("kind", "strength", "threshold"):
            action.help = argparse.SUPPRESS
    study.set_defaults(func=cmd_study)

    bench_parser = sub.add_parser(
        "bench",
        help="run the benchmark harness (arguments are passed through)",
        add_help=False,
    )
    bench_parser.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench_parser.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``fastsparse`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:  # pass everything through, options included (even --help)
        args = argparse.Namespace(command="bench", func=cmd_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    try:
        return args.func(args)
    except (UsageError, ConfigError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
