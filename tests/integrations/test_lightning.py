"""The Lightning callback: a Lightning Trainer with SparsityCallback changes the weights as a
plain loop with SparseOptimizer does over the same batches, and saves and restores its state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastsparse.optim import Rule, SparseOptimizer

lightning = pytest.importorskip("lightning")

from fastsparse.integrations.lightning import SparsityCallback  # noqa: E402

LR = 0.05
STEPS = 6


class Module(lightning.LightningModule):
    def __init__(self, schedule=False):
        super().__init__()
        self.schedule = schedule
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(),
                                 nn.Linear(12, 2))  # fmt: skip

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        if not self.schedule:
            return opt
        step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": step_lr, "interval": "step"}}


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)) for _ in range(STEPS)]


def _loader():
    xs, ys = zip(*_batches())
    dataset = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    return torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False)


def _rules():
    return [
        Rule(r"net\.0\.weight", prox="group_lasso", strength=4.0),
        Rule(r"net\.2\.weight", penalty="group_lasso", strength=0.1),
    ]


def _trainer(callback, steps=STEPS, **options):
    return lightning.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **options,
    )  # fmt: skip


@pytest.mark.parametrize("schedule", [False, True], ids=["constant-lr", "step-lr"])
def test_callback_equals_the_sparse_optimizer(schedule):
    module = Module(schedule)
    direct = copy.deepcopy(module)
    callback = SparsityCallback(_rules(), warmup_steps=1, heal_from=4, log=False, every=2)
    _trainer(callback).fit(module, _loader())

    configured = direct.configure_optimizers()
    base = configured["optimizer"] if schedule else configured
    opt = SparseOptimizer(base, direct, _rules(), warmup_steps=1, heal_from=4, every=2)
    for batch in _batches():
        direct.training_step(batch, 0).backward()
        opt.step()
        if schedule:  # Lightning steps the scheduler before the hook that ends the step
            configured["lr_scheduler"]["scheduler"].step()
        opt.zero_grad()
    assert callback.sparsifier.steps == opt.steps == STEPS
    for p, q in zip(module.parameters(), direct.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if not schedule:  # with the halving learning rate the prox is too weak to zero a row
        assert 0 < callback.sparsifier.sparsity()["net.0.weight"] < 1


def test_state_is_saved_and_restored(tmp_path):
    module = Module()
    callback = SparsityCallback(_rules(), heal_from=2)
    trainer = _trainer(callback, steps=3)
    trainer.fit(module, _loader())
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    saved = callback.state_dict()
    assert saved["steps"] == 3 and saved["frozen"] is not None

    resumed = SparsityCallback(_rules(), heal_from=2)
    _trainer(resumed, steps=5).fit(Module(), _loader(), ckpt_path=path)
    assert resumed.sparsifier.steps == 5
    for before, after in zip(saved["frozen"], resumed.sparsifier.state_dict()["frozen"]):
        for a, b in zip(before, after):
            assert torch.equal(a, b)
