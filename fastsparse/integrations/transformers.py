"""A transformers `TrainerCallback` that applies sparsity rules around the Trainer's steps.

The Trainer clips the gradients, calls ``on_pre_optimizer_step`` (the penalties are added
here, after unscaling and clipping), steps the optimizer and calls ``on_optimizer_step`` (the
proximal steps, targets and healing run here). Importing this module imports transformers.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from transformers import TrainerCallback

from fastsparse.optim import Rule, Sparsifier


class SparsityCallback(TrainerCallback):
    """Structured sparsity in a transformers `Trainer`, by rules (`fastsparse.Rule`).

    Args:
        rules: the rules; their parameter names are the Trainer model's.
        log: add the fraction of zero groups (``"sparsity"``, and one entry per rule
            parameter as ``"sparsity/<name>"``) to every log (a host sync per log).
        **options: `fastsparse.optim.Sparsifier` options (warmup_steps, every, heal_from,
            heal_elements, example_inputs, backend).

    The callback's step count (for warmup, every and healing) is the Trainer's optimizer
    steps; a step that the AMP grad scaler skips still counts.

    Example:
        >>> from transformers import Trainer  # doctest: +SKIP
        >>> callback = SparsityCallback([Rule(r".*mlp\\..*", groups="neurons", target=0.5)])
        >>> trainer = Trainer(model, args, train_dataset=data, callbacks=[callback])  # +SKIP
    """

    def __init__(self, rules: Sequence[Rule], *, log: bool = True, **options: Any):
        self.rules = list(rules)
        self.log = log
        self.options = options
        self.sparsifier: Optional[Sparsifier] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("SparsityCallback needs the Trainer's model and optimizer")
        self.sparsifier = Sparsifier(model, self.rules, optimizer, **self.options)
        # A resumed run: the optimizer steps already taken count for warmup and healing.
        self.sparsifier.steps = state.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.after_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.sparsifier.end_epoch()

    def on_train_end(self, args, state, control, **kwargs):
        if self.sparsifier is not None:
            self.sparsifier.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log or self.sparsifier is None or logs is None:
            return
        report = self.sparsifier.sparsity()
        entries = {"sparsity": report.pop("total")}
        entries.update({f"sparsity/{name}": value for name, value in report.items()})
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)
