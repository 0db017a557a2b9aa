"""Layer types beyond plain conv/linear/BatchNorm, each zeroed on the producer side only (filter
rows, bias, following BatchNorm) and then pruned: grouped and depthwise convs (removal balanced
over conv groups), norms across channels (their groups left whole, with the reason, while the
rest prunes), nn.MultiheadAttention, a channel shuffle and the size guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsparse.pruning import PruningError, coupled_groups, load_pruned, prune
from fastsparse.pruning.graph import trace
from fastsparse.pruning.surgery import balanced_channels
from tests.helpers import eval_out


@torch.no_grad()
def zero_producers(model, channels):
    """Zero the producers of `channels` ({conv or linear name: [out-channel]}), with the
    BatchNorm that follows (`bn_of`), never a consumer's in-slice."""
    for name, rows in channels.items():
        layer = model.get_submodule(name)
        layer.weight[rows] = 0
        if layer.bias is not None:
            layer.bias[rows] = 0
        bn = getattr(model, f"bn_{name}", None)
        if bn is not None:
            bn.weight[rows] = 0
            bn.bias[rows] = 0


class GroupedNet(nn.Module):
    """1x1 conv -> grouped 3x3 conv (ResNeXt's bottleneck) or depthwise -> 1x1 conv -> head."""

    def __init__(self, groups: int):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.head(self.c(x).mean(dim=(2, 3)))


def randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "dead_a, dead_b, kept_a, kept_b",
    [
        # 4 conv groups of 4 channels. a's dead channels are 2, 1, 1, 1 per conv group: one
        # per conv group goes, the extra one stays (zero); b's are 1, 1, 1, 0: none can go.
        ([0, 1, 4, 8, 12], [0, 4, 8], 12, 16),
        ([0, 1, 4, 5, 8, 9, 12, 13], [0, 4, 8, 12, 13], 8, 12),
    ],
)
def test_grouped_conv_removes_as_many_channels_from_each_conv_group(dead_a, dead_b, kept_a, kept_b):
    model = randomized(GroupedNet(groups=4))
    x = torch.randn(2, 3, 8, 8)
    zero_producers(model, {"a": dead_a, "b": dead_b})
    small = prune(model, x)
    assert (small.a.out_channels, small.b.in_channels) == (kept_a, kept_a)
    assert (small.b.out_channels, small.c.in_channels, small.b.groups) == (kept_b, kept_b, 4)
    assert small.b.weight.shape == (kept_b, kept_a // 4, 3, 3)
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)
    loaded = load_pruned(GroupedNet(groups=4), small.state_dict())
    assert (loaded.b.in_channels, loaded.b.out_channels) == (kept_a, kept_b)
    torch.testing.assert_close(eval_out(loaded, x), eval_out(small, x))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_grouped_conv_in_channels_keep_each_conv_groups_own_columns():
    """Removing in-channel 1 of conv group 0 and 6 of group 1 (of 4 per group): each group's
    rows keep their own remaining columns, which no single column index of the weight does."""
    model = randomized(GroupedNet(groups=4))
    x = torch.randn(1, 3, 8, 8)
    zero_producers(model, {"a": [1, 6, 11, 12]})
    small = prune(model, x)
    w, w0 = small.b.weight, model.b.weight
    for g, kept in enumerate([[0, 2, 3], [0, 1, 3], [0, 1, 2], [1, 2, 3]]):
        torch.testing.assert_close(w[4 * g : 4 * g + 4], w0[4 * g : 4 * g + 4, kept])
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)


def test_grouped_conv_in_channels_of_a_channels_last_model():
    model = randomized(GroupedNet(groups=4)).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last)
    zero_producers(model, {"a": [1, 6, 11, 12]})
    small = prune(model, x)
    assert small.b.weight.shape == (16, 3, 3, 3)
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)


def test_depthwise_conv_prunes_with_its_producer():
    model = randomized(GroupedNet(groups=16))
    x = torch.randn(1, 3, 8, 8)
    # The depthwise filter and its BatchNorm produce the same channel (one coupled group): a
    # channel whose depthwise BatchNorm shift is not zero is a constant, not dead.
    zero_producers(model, {"a": [2, 3, 9], "b": [2, 3]})
    small = prune(model, x)
    assert (small.a.out_channels, small.b.in_channels, small.b.groups) == (14, 14, 14)
    zero_producers(model, {"b": [9]})
    small = prune(model, x)
    assert (small.a.out_channels, small.b.in_channels, small.b.groups) == (13, 13, 13)
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)


def test_balanced_channels_drops_the_extra_dead_channels_of_fuller_conv_groups():
    blocks = torch.tensor([0, 0, 0, 1, 1, 1, -1])
    norms = torch.tensor([0.3, 0.1, 0.2, 0.0, 0.5, 0.5, 0.0])
    assert balanced_channels([0, 1, 2, 3, 6], norms, [(blocks, 2)]) == [1, 3, 6]
    assert balanced_channels([0, 1, 6], norms, [(blocks, 2)]) == [6]


class TransformerBlock(nn.Module):
    """A residual stream with a norm on it (LayerNorm or GroupNorm) and a Linear-GELU-Linear
    MLP whose hidden neurons are not normalized: those prune, the stream's group is left whole."""

    def __init__(self, norm: str):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8) if norm == "layer" else nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)
        self.head = nn.Linear(8, 3)
        self.kind = norm

    def forward(self, x):  # x: [batch, tokens, 6]
        h = self.embed(x)
        n = self.norm(h) if self.kind == "layer" else self.norm(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.fc2(nn.functional.gelu(self.fc1(n)))
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_norm_across_channels_leaves_its_group_whole_and_the_mlp_prunes(norm):
    torch.manual_seed(0)
    model, x = TransformerBlock(norm).eval(), torch.randn(2, 5, 6)
    zero_producers(model, {"fc1": list(range(0, 32, 3)), "embed": [0, 1]})
    groups = coupled_groups(model, x)
    assert [g.root for g in groups] == ["fc1"]
    traced = trace(model, x)
    assert [root for root, _ in traced.skipped] == ["embed"]
    assert "normalizes across channels" in traced.skipped[0][1]
    assert "'norm'" in traced.skipped[0][1]
    with pytest.warns(UserWarning, match="normalizes across channels"):
        small = prune(model, x)
    assert (small.fc1.out_features, small.fc2.in_features) == (21, 21)
    assert small.embed.out_features == 8  # its zero channels still feed the norm's statistics
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)


class Shuffled(nn.Module):
    """conv -> channel shuffle (view, transpose, view) -> conv: channel c of `a` is not channel c
    of `b`'s input, which the dependency graph does not see."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.b(y).mean(dim=(2, 3)))


def test_channel_shuffle_leaves_its_group_whole_with_the_reason():
    torch.manual_seed(0)
    model, x = Shuffled().eval(), torch.randn(1, 3, 4, 4)
    zero_producers(model, {"a": [0, 5], "b": [1]})
    traced = trace(model, x)
    assert [g.root for g in traced.groups] == ["b"]
    assert traced.skipped[0][0] == "a"
    assert "reshape from [1, 8, 4, 4] to [1, 2, 4, 4, 4] splits" in traced.skipped[0][1]
    with pytest.warns(UserWarning, match="splits a dimension"):
        small = prune(model, x)
    assert (small.a.out_channels, small.b.out_channels) == (8, 7)
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(PruningError, match="splits a dimension"):
        prune(model, x, strict=True)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.fc2(torch.relu(self.fc1(a))).mean(dim=1)


def test_multihead_attention_is_left_whole_and_the_mlp_after_it_prunes():
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 5, 6)
    zero_producers(model, {"fc1": [0, 3, 7], "embed": [2]})
    traced = trace(model, x)
    assert [g.root for g in traced.groups] == ["fc1"]
    reasons = dict(traced.skipped)
    assert "nn.MultiheadAttention 'attn' cannot be pruned" in reasons["embed"]
    assert "heads' width" in reasons["attn"]
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        small = prune(model, x)
    assert (small.fc1.out_features, small.fc2.in_features, small.embed.out_features) == (13, 13, 8)
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)


class Windows(nn.Module):
    """Each block folds its tokens into 2x2 windows and back (view, permute, view), which the
    dependency graph reads as flattens: the channel indices it follows grow with the blocks
    (Swin-T's, at 224x224, to tens of GB). A small budget stands for the real one here."""

    def __init__(self, blocks: int):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.mix = nn.ModuleList(nn.Linear(8, 8) for _ in range(blocks))
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x).permute(0, 2, 3, 1)  # [n, H, W, C]
        n, hh, ww, c = h.shape
        for mix in self.mix:
            w = h.view(n, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
            w = mix(w)
            w = w.view(n, hh // 2, ww // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, hh, ww, c)
            h = h + w
        return self.fc2(torch.relu(self.fc1(h))).mean(dim=(1, 2))


def test_index_budget_gives_up_on_groups_that_blow_up(monkeypatch):
    import fastsparse.pruning.graph as graph

    torch.manual_seed(0)
    model, x = Windows(blocks=3).eval(), torch.randn(1, 3, 8, 8)
    monkeypatch.setattr(graph, "INDEX_BUDGET", 200)
    traced = trace(model, x)
    assert any("exceeds 200 indices" in why for _, why in traced.skipped)
    assert [g.root for g in traced.groups] == ["fc1"]
    zero_producers(model, {"fc1": [1, 2]})
    with pytest.warns(UserWarning, match="left whole"):
        small = prune(model, x)
    assert small.fc1.out_features == 14
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)


def test_unsupported_weight_layers_are_named():
    class Conv1D(nn.Module):  # transformers' GPT-2 layer: x @ W + b, W stored [in, out]
        def __init__(self, n_in, n_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n_in, n_out))
            self.bias = nn.Parameter(torch.zeros(n_out))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight)

    model = nn.Sequential(Conv1D(4, 8), nn.ReLU(), Conv1D(8, 2))
    traced = trace(model, torch.randn(3, 4))
    assert traced.groups == []
    assert traced.skipped == [
        (
            "0",
            "2 Conv1D layer(s) ('0', ...) are not supported: fastsparse removes channels of "
            "Conv1d/2d/3d (not transposed), Linear, BatchNorm1d/2d/3d only",
        )
    ]
