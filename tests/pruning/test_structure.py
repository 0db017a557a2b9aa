"""How a model is pruned (fastsparse.pruning.structure) is decided once per public call: the
decoder blocks are looked for once, whatever the call copies, traces or prunes after that."""

import sys

import pytest
import torch

import fastsparse as fs
import fastsparse.pruning.transformer as transformer
from fastsparse.pruning.structure import Structure, structure_of
from fastsparse.workflow.models import LeNet5
from tests.helpers import tiny_llama


@pytest.fixture
def block_searches(monkeypatch):
    """The models `decoder_blocks` is asked about, wherever fastsparse calls it from."""
    original, asked = transformer.decoder_blocks, []

    def counting(model):
        asked.append(type(model).__name__)
        return original(model)

    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "") or ""
        if name.startswith("fastsparse") and getattr(module, "decoder_blocks", None) is original:
            monkeypatch.setattr(module, "decoder_blocks", counting)
    return asked


CALLS = {
    "coupled_groups": lambda model, x: fs.coupled_groups(model, x),
    "prune": lambda model, x: fs.prune(model, x),
    "sparsity_report": lambda model, x: fs.sparsity_report(model, x),
    "threshold_": lambda model, x: fs.threshold_(model, x, 0.5),
    "threshold_and_prune": lambda model, x: fs.threshold_and_prune(model, x, 0.5),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_traced_model_is_searched_for_decoder_blocks_once_per_call(call, block_searches):
    torch.manual_seed(0)
    CALLS[call](LeNet5(), torch.randn(1, 1, 28, 28))
    assert block_searches == ["LeNet5"]


def _llama():
    pytest.importorskip("transformers")
    return tiny_llama()


DECODER_CALLS = {
    **{name: CALLS[name] for name in ("coupled_groups", "prune", "sparsity_report")},
    "prune_transformer": lambda model, x: fs.pruning.prune_transformer(model, x),
}


@pytest.mark.parametrize("call", list(DECODER_CALLS))
def test_a_decoder_is_searched_for_decoder_blocks_once_per_call(call, block_searches):
    model = _llama()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    DECODER_CALLS[call](model, ids)
    assert block_searches == ["LlamaForCausalLM"]


def test_the_structure_names_the_decoder_blocks_and_holds_for_a_pruned_copy():
    model = _llama()
    structure = structure_of(model)
    assert structure == Structure(("model.layers.0", "model.layers.1"))
    assert structure.is_decoder
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:5] = 0
    pruned = fs.prune(model, torch.zeros(1, 4, dtype=torch.long))
    assert pruned.model.layers[0].mlp.up_proj.out_features == 43
    assert structure_of(pruned) == structure
    assert not structure_of(LeNet5()).is_decoder
