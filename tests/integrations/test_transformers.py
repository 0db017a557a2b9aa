"""The transformers callback: a Trainer with SparsityCallback changes the weights exactly as the
same Trainer given a SparseOptimizer, reaches the rules' targets, logs sparsity, and the
pruned model gives the same logits. Tiny Llama from a config, CPU, no download."""

from __future__ import annotations

import copy

import pytest
import torch

import fastsparse as fs
from fastsparse.optim import Rule, SparseOptimizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fastsparse.integrations.transformers import SparsityCallback  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402

STEPS = 4


def _llama():
    return tiny_llama().train()


def _data():
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 64, (8, 8), generator=g)
    return [{"input_ids": r, "labels": r} for r in rows]


def _args(tmp_path):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
        learning_rate=1e-2, logging_steps=2, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, max_grad_norm=1.0,
    )  # fmt: skip


RULES = [
    Rule(r".*self_attn\..*", groups="heads", target=0.5, ramp_steps=2),
    Rule(r".*mlp\..*", groups="neurons", prox="group_lasso", strength=0.5),
]


def test_callback_equals_the_sparse_optimizer(tmp_path):
    model = _llama()
    direct = copy.deepcopy(model)
    callback = SparsityCallback(RULES, warmup_steps=1)
    trainer = transformers.Trainer(
        model=model, args=_args(tmp_path / "a"), train_dataset=_data(), callbacks=[callback],
        optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-2), None),
    )  # fmt: skip
    trainer.train()

    sparse = SparseOptimizer(torch.optim.AdamW(direct.parameters(), lr=1e-2), direct, RULES,
                             warmup_steps=1)  # fmt: skip
    transformers.Trainer(
        model=direct, args=_args(tmp_path / "b"), train_dataset=_data(),
        optimizers=(sparse, None),
    ).train()  # fmt: skip

    assert callback.sparsifier.steps == sparse.steps == STEPS
    for (name, p), q in zip(model.named_parameters(), direct.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    report = callback.sparsifier.sparsity()
    heads = [v for k, v in report.items() if "self_attn" in k]
    assert heads == [0.5, 0.5]
    logged = [entry for entry in trainer.state.log_history if "sparsity" in entry]
    assert logged and 0 < logged[-1]["sparsity"] <= 1

    model.eval()
    ids = torch.stack([row["input_ids"] for row in _data()[:2]])
    pruned = fs.prune(copy.deepcopy(model), ids, threshold=0.0)
    assert pruned.config.num_key_value_heads < model.config.num_key_value_heads or any(
        layer.self_attn.k_proj.out_features < 16 for layer in pruned.model.layers
    )
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_callback_without_model_is_refused():
    callback = SparsityCallback(RULES)
    with pytest.raises(RuntimeError, match="model and optimizer"):
        callback.on_train_begin(None, None, None, model=None, optimizer=None)
