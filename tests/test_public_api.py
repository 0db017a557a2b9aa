"""The public surface stays: every name of `fastsparse.__all__` and every CLI command and flag."""

import argparse
import subprocess
import sys

import pytest

import fastsparse
from fastsparse.workflow.cli import build_parser

PUBLIC_NAMES = {
    "ACROSS_GROUP_KINDS",
    "BACKENDS",
    "GROUPINGS",
    "KINDS",
    "PROX_KINDS",
    "CoupledGroup",
    "PruningError",
    "Regularizer",
    "SparsityReport",
    "__version__",
    "add_penalty_grad_",
    "count_macs",
    "coupled_groups",
    "group_norms",
    "load_pruned",
    "penalty",
    "prox_",
    "prune",
    "sparsity_report",
}

RUN_FLAGS = {
    "--alpha", "--amp", "--backend", "--batch-size", "--compile", "--data-dir", "--dataset",
    "--device", "--epochs", "--groups", "--kind", "--lr", "--lr-schedule", "--method-options",
    "--mode", "--model", "--momentum", "--no-progress", "--regularize", "--schedule", "--seed",
    "--strength", "--test-samples", "--threads", "--threshold", "--threshold-mode",
    "--train-samples", "--warmup", "--weight-decay",
}  # fmt: skip
COMMAND_FLAGS = {
    "demo": RUN_FLAGS,
    "train": RUN_FLAGS | {"--config", "--out"},
    "study": RUN_FLAGS
    | {
        "--inference-repeats",
        "--kinds",
        "--no-baseline",
        "--out",
        "--resume",
        "--strengths",
        "--thresholds",
    },
    "bench": set(),
}


def test_every_public_name_is_exported_and_importable():
    assert set(fastsparse.__all__) >= PUBLIC_NAMES
    for name in fastsparse.__all__:
        assert getattr(fastsparse, name) is not None, name


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES - {"__version__"}))
def test_public_callables_and_classes_have_docstrings(name):
    obj = getattr(fastsparse, name)
    if callable(obj):
        assert obj.__doc__ and obj.__doc__.strip(), name


def _subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("the fastsparse parser has no subcommands")


def test_every_command_keeps_its_flags():
    commands = _subcommands(build_parser())
    assert set(commands) == set(COMMAND_FLAGS)
    for name, flags in COMMAND_FLAGS.items():
        options = {o for a in commands[name]._actions for o in a.option_strings}
        assert flags <= options, (name, sorted(flags - options))


@pytest.mark.parametrize("command", sorted(COMMAND_FLAGS))
def test_python_dash_m_help_runs(command):
    args = [sys.executable, "-m", "fastsparse", command, "--help"]
    if command == "bench":  # bench passes --help on to the harness; --list is cheaper
        args[-1] = "--list"
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
