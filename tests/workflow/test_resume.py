"""Checkpoints and `fastsparse train --resume`: a resumed run ends with the uninterrupted run's
weights, bit for bit; checkpoints are written atomically, every N steps and every epoch."""

import pytest
import torch

from fastsparse.workflow import checkpoints, cli
from fastsparse.workflow.config import RunConfig
from fastsparse.workflow.loop import train
from fastsparse.workflow.run import build_model, load_data, make_regularizer

SMALL = ["--epochs", "2", "--train-samples", "320", "--test-samples", "64", "--batch-size", "64"]


def _config(**overrides):
    return RunConfig(
        kind="group_lasso", epochs=2, train_samples=320, test_samples=64, batch_size=64, **overrides
    )


def _fresh(config, data):
    torch.manual_seed(config.seed)
    model = build_model(config, data)
    reg = make_regularizer(model, data.test_images[:1], "group_lasso", 1e-2)
    return model, reg


@pytest.mark.parametrize("resume_at", [1, 2, 4])  # mid epoch 1, its end, mid epoch 2
def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(resume_at):
    config = _config()
    data = load_data(config)
    model, reg = _fresh(config, data)
    states = []
    train(model, data, config, reg, progress=False, checkpoint=states.append, checkpoint_every=2)
    # 5 steps per epoch, every 2 steps + each epoch's end: (1, 2), (1, 4), end 1, (2, 1), ...
    assert [(s["epoch"], s["step_in_epoch"]) for s in states] == [
        (0, 2), (0, 4), (1, 0), (1, 1), (1, 3), (2, 0)
    ]  # fmt: skip
    state = states[resume_at]
    resumed, reg2 = _fresh(config, data)
    stats = train(resumed, data, config, reg2, progress=False, resume=state)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert len(stats.epochs) == 2


def test_cli_resume_after_an_interrupt(tmp_path, capsys, monkeypatch):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli.main(["train", "--out", str(whole), "--no-progress", *SMALL]) == 0

    saves = []
    real_save = checkpoints.save_atomically

    def interrupt_after_three(obj, path):
        real_save(obj, path)
        saves.append(path)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_atomically", interrupt_after_three)
    status = cli.main(
        ["train", "--out", str(part), "--no-progress", "--checkpoint-every", "2", *SMALL]
    )
    err = capsys.readouterr().err
    assert status == 130
    assert f"last checkpoint: {part / 'checkpoint.pt'}" in err
    assert f"fastsparse train --resume {part}" in err
    monkeypatch.setattr(checkpoints, "save_atomically", real_save)
    assert cli.main(["train", "--resume", str(part), "--no-progress"]) == 0
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(part / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(part.glob(".*.tmp"))  # no temporary file left behind


def test_resume_refuses_other_settings(tmp_path, capsys):
    status = cli.main(["train", "--resume", str(tmp_path), "--epochs", "3"])
    assert status == 2
    assert "--epochs cannot be combined with --resume" in capsys.readouterr().err
    status = cli.main(["train", "--resume", str(tmp_path)])
    assert status == 2 and "no checkpoint.pt there" in capsys.readouterr().err


def test_atomic_save_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoints.save_atomically({"a": torch.ones(2)}, path)

    def broken_save(obj, f):
        with open(f, "wb") as half:
            half.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoints.save_atomically({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))
