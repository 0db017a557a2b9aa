"""Checkpoint files of ``fastsparse train``: written atomically, read back for ``--resume``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import torch

from fastsparse.workflow.config import RunConfig

__all__ = ["CHECKPOINT_NAME", "load_checkpoint", "save_atomically"]

# The file in a run's output folder that holds its last training state.
CHECKPOINT_NAME = "checkpoint.pt"


def save_atomically(obj, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a half-written file.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / CHECKPOINT_NAME
        >>> save_atomically({"epoch": 1}, path)
        >>> torch.load(path)["epoch"]
        1
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def load_checkpoint(path: Path) -> Tuple[RunConfig, dict]:
    """(the run's config, the training state) of a checkpoint that `save_atomically` wrote.

    Raises ConfigError for settings that are no longer valid, and KeyError, RuntimeError,
    EOFError or ValueError for a file that is not such a checkpoint.

    Example:
        >>> path = Path("fastsparse-run") / CHECKPOINT_NAME
        >>> config, state = load_checkpoint(path)  # doctest: +SKIP
        >>> state["epoch"], config.kind  # doctest: +SKIP
        (10, 'group_l1l2')
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    return RunConfig.from_dict(state["config"], source=str(path)), state
