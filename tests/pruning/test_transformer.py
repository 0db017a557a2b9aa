"""Heads and MLP neurons of small Llama-family models built from configs (no download): GQA
groups and neurons whose producers are zero are removed; logits, generate and reload agree."""

import io

import pytest
import torch

import fastsparse as fs
from fastsparse.pruning.transformer import decoder_blocks, transformer_groups
from tests.helpers import tiny_llama

transformers = pytest.importorskip("transformers")


_llama = tiny_llama


def _qwen2():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config).eval()


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _zero_producers(groups, chosen):
    with torch.no_grad():
        for group, ids in zip(groups, chosen):
            for m in group.members:
                if m.dim == 0:
                    m.param.index_fill_(0, m.index[torch.isin(m.group, ids)], 0.0)


@pytest.mark.parametrize("build", [_llama, _qwen2, lambda: _llama(num_key_value_heads=4)],
                         ids=["llama-gqa", "qwen2-bias", "llama-mha"])  # fmt: skip
def test_zero_heads_and_neurons_are_removed_losslessly(build):
    model = build()
    groups = transformer_groups(model)
    assert len(groups["heads"]) == len(groups["neurons"]) == 2
    _zero_producers(groups["heads"], [torch.tensor([1]), torch.tensor([], dtype=torch.long)])
    _zero_producers(groups["neurons"], [torch.arange(5), torch.arange(10, 20)])
    small = fs.prune(model, IDS)
    with torch.no_grad():
        before, after = model(IDS).logits, small(IDS).logits
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-5  # fp32, eval
    attn = small.model.layers[0].self_attn
    kv_heads = model.config.num_key_value_heads
    assert attn.k_proj.out_features == (kv_heads - 1) * attn.head_dim
    assert attn.q_proj.out_features == attn.o_proj.in_features
    assert small.model.layers[0].mlp.gate_proj.out_features == 43
    assert small.model.layers[1].mlp.down_proj.in_features == 38
    assert model.model.layers[0].mlp.gate_proj.out_features == 48  # the model is left alone
    torch.testing.assert_close(
        small.generate(IDS, max_new_tokens=4, do_sample=False),
        model.generate(IDS, max_new_tokens=4, do_sample=False),
    )
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    buffer.seek(0)
    reloaded = fs.load_pruned(build(), torch.load(buffer, weights_only=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, after)


def test_threshold_removes_small_groups_as_the_thresholded_model():
    model = _llama()
    groups = transformer_groups(model)
    with torch.no_grad():
        for m in groups["neurons"][0].members:
            if m.dim == 0:
                m.param.index_copy_(0, m.index[:6], m.param[m.index[:6]] * 1e-4)
    small = fs.prune(model, IDS, threshold=1e-3)  # verified against the zeroed copy inside
    assert small.model.layers[0].mlp.up_proj.out_features == 42
    # The kept rows and columns are the model's, exactly (the dead ones were zeroed to verify)
    (up,) = [m for m in groups["neurons"][0].members if m.name.endswith("up_proj.weight")]
    kept = up.index[6:]
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        got = getattr(small.model.layers[0].mlp, name).weight
        expected = getattr(model.model.layers[0].mlp, name).weight.index_select(dim, kept)
        assert torch.equal(got, expected), name


def test_penalty_groups_are_the_removal_groups():
    model = _llama()
    groups = transformer_groups(model)
    reg = fs.Regularizer(None, "group_lasso", 1e-2, groups=groups["heads"] + groups["neurons"])
    reg().backward()
    assert model.model.layers[0].self_attn.v_proj.weight.grad is not None
    assert [name for name, _, _ in decoder_blocks(model)] == ["model.layers.0", "model.layers.1"]


def test_sparsity_report_counts_heads_and_neurons_as_prune_removes_them():
    model = _llama()
    groups = transformer_groups(model)
    _zero_producers(groups["heads"], [torch.tensor([1]), torch.tensor([0])])
    _zero_producers(
        groups["neurons"], [torch.tensor([0, 5, 7]), torch.tensor([], dtype=torch.long)]
    )
    report = fs.sparsity_report(model, IDS)
    rows = {layer.name: layer for layer in report.layers}
    q, k = rows["model.layers.0.self_attn.q_proj"], rows["model.layers.0.self_attn.k_proj"]
    assert (q.filters, q.alive, q.filters_after, q.prunable) == (32, 16, 16, True)
    assert (k.filters, k.alive, k.filters_after) == (16, 8, 8)
    gate = rows["model.layers.0.mlp.gate_proj"]
    assert (gate.filters, gate.alive, gate.filters_after) == (48, 45, 45)
    assert rows["model.layers.1.mlp.up_proj"].filters_after == 48
    assert not rows["model.layers.0.self_attn.o_proj"].prunable
    pruned = fs.prune(model, IDS)
    assert report.params_after == sum(p.numel() for p in pruned.parameters()) < report.params
    assert report.macs_after < report.macs
    assert "q_proj" in str(report)


def test_a_neuron_with_only_its_up_row_zero_is_dead():
    model = _llama()
    (layer0, layer1) = transformer_groups(model)["neurons"]
    with torch.no_grad():
        for group, ids in ((layer0, [2, 9]), (layer1, [4])):
            up = next(m for m in group.members if m.name.endswith("up_proj.weight"))
            up.param.index_fill_(0, torch.tensor(ids), 0.0)  # gate rows and down columns intact
    pruned = fs.prune(model, IDS)
    assert [b.mlp.down_proj.in_features for b in pruned.model.layers] == [46, 47]
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    report = fs.sparsity_report(model, IDS)
    assert {layer.name: layer.alive for layer in report.layers}["model.layers.0.mlp.up_proj"] == 46


def test_pruned_layers_keep_the_frozen_flags_of_the_model():
    model = _qwen2()  # q/k/v biases: the sliced layers' biases are new parameters too
    for name, p in model.named_parameters():
        p.requires_grad_("layers.0." not in name)
    _zero_producers(transformer_groups(model)["heads"], [torch.tensor([1]), torch.tensor([0])])
    pruned = fs.prune(model, IDS)
    assert pruned.model.layers[0].self_attn.k_proj.out_features < model.config.hidden_size
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: p.requires_grad for n, p in pruned.named_parameters()} == flags
    assert not pruned.model.layers[0].self_attn.q_proj.bias.requires_grad
