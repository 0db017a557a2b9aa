"""A Lightning `Callback` that applies sparsity rules around the optimizer steps.

Lightning calls ``on_before_optimizer_step`` after the backward pass (and after unscaling with
AMP) but before it clips the gradients: the penalties are added there. The proximal steps,
targets and healing run in ``on_train_batch_end`` of each batch that stepped the optimizer.
Importing this module imports lightning.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import Callback

from fastsparse.optim import Rule, Sparsifier


class SparsityCallback(Callback):
    """Structured sparsity in a Lightning `Trainer`, by rules (`fastsparse.Rule`).

    Args:
        rules: the rules; their parameter names are the LightningModule's.
        log: log the fraction of zero groups (``"sparsity"``) at the end of every epoch.
        **options: `fastsparse.optim.Sparsifier` options (warmup_steps, every, heal_from,
            heal_elements, example_inputs, backend).

    One optimizer (automatic optimization); its steps count for warmup, every and healing.
    The callback's state (steps, healing masks) is saved in checkpoints and restored.

    Example:
        >>> import lightning  # doctest: +SKIP
        >>> callback = SparsityCallback([Rule(prox="group_lasso", strength=1e-3)])
        >>> lightning.Trainer(max_epochs=3, callbacks=[callback]).fit(module, data)  # +SKIP
    """

    def __init__(self, rules: Sequence[Rule], *, log: bool = True, **options: Any):
        self.rules = list(rules)
        self.log = log
        self.options = options
        self.sparsifier: Optional[Sparsifier] = None
        self._restored: Optional[dict] = None
        self._steps_seen = 0

    def on_fit_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"SparsityCallback takes one optimizer, the trainer has {len(trainer.optimizers)}"
            )
        self.sparsifier = Sparsifier(pl_module, self.rules, trainer.optimizers[0], **self.options)
        if self._restored is not None:
            self.sparsifier.load_state_dict(self._restored)
        self._steps_seen = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sparsifier.before_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._steps_seen:  # this batch stepped the optimizer
            self._steps_seen = trainer.global_step
            self.sparsifier.after_step()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.sparsifier is None:
            return
        self.sparsifier.end_epoch()
        if self.log:
            pl_module.log("sparsity", self.sparsifier.sparsity()["total"])

    def on_fit_end(self, trainer, pl_module):
        if self.sparsifier is not None:
            self.sparsifier.close()

    def state_dict(self) -> dict:
        return {} if self.sparsifier is None else self.sparsifier.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict or None
