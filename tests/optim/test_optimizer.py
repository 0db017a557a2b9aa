"""SparseOptimizer against the float64 oracle: every prox kind and grouping after a real step,
penalties, targets (per layer and global), warmup, prox every N steps with summed learning
rates, healing (zeros stay zero under momentum and Adam), resume equal to an uninterrupted run,
GradScaler, clipping and LR schedulers, and the errors of a bad call."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import fastsparse as fs
import fastsparse.reference as ref
from fastsparse.core.contract import AdamStepOptions, SGDStepOptions
from fastsparse.optim import RULE_PROX_KINDS, Rule, SparseOptimizer
from tests.helpers import coupled_models, tiny_llama

LR = 0.05


def _net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(),
        nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 3),
    ).to(dtype)  # fmt: skip


def _batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=dtype)


def _backward(model, x):
    model(x).pow(2).mean().backward()


def _threshold_for(model, names, grouping, quantile=0.4, lr=LR):
    """A strength whose threshold (strength * lr) kills some groups but not all."""
    norms = torch.cat([ref.group_norms([model.get_parameter(n)], grouping)[0] for n in names])
    return torch.quantile(norms, quantile).item() / lr


STRUCTURES = [
    ("filters", None),
    ("channels", None),
    ("kernels", None),
    (None, None),
    ("blocks", 4),
]


@pytest.mark.parametrize("kind", RULE_PROX_KINDS)
@pytest.mark.parametrize("grouping,block", STRUCTURES, ids=[str(g) for g, _ in STRUCTURES])
def test_prox_step_equals_oracle(kind, grouping, block, backend):
    names = ["0.weight", "2.weight"] + ([] if grouping == "kernels" else ["5.weight"])
    model, x = _net(), _batch()
    expected = copy.deepcopy(model)
    oracle_grouping = "filters" if grouping == "blocks" else grouping
    strength = _threshold_for(model, names, "filters" if grouping == "blocks" else grouping)
    if kind in ("l1", "l0"):
        strength = 0.05 / LR
    if kind in ("l0_group_lasso", "sparse_group_lasso"):
        strength = (0.01 / LR, strength)
    rule = Rule(names, prox=kind, strength=strength, groups=grouping, block_size=block)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule],
                          backend=backend)  # fmt: skip
    _backward(model, x)
    opt.step()

    _backward(expected, x)
    with torch.no_grad():
        for p in expected.parameters():
            p -= LR * p.grad
        weights = [expected.get_parameter(n) for n in names]
        if grouping == "blocks":
            weights = [w.view(-1, block) for w in weights]
        s = strength if isinstance(strength, tuple) else (strength, strength)
        if kind == "sparse_group_lasso":
            ref.prox_(weights, "l1", s[0] * LR, oracle_grouping)
            ref.prox_(weights, "group_lasso", s[1] * LR, oracle_grouping)
        elif kind == "l0_group_lasso":
            ref.prox_(weights, kind, (s[0] * LR, s[1] * LR), oracle_grouping)
        else:
            ref.prox_(weights, kind, s[0] * LR, oracle_grouping)
    for (name, p), e in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12, msg=name)
    zero_groups = sum(
        int((ref.grouped_view(w.detach(), oracle_grouping) == 0).all(dim=1).sum()) for w in weights
    )
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros > 0 and (zero_groups > 0 or kind in ("l1", "l0"))  # the step did something


def test_sparse_group_lasso_is_the_exact_prox_of_the_sum():
    # min_v 0.5|v - w|^2 + t1 |v|_1 + t2 |v|_2 over one group, checked against a direct solve
    torch.manual_seed(3)
    w = torch.randn(1, 6, dtype=torch.float64)
    t1, t2 = 0.3, 0.5
    v = w.clone()
    ref.prox_(v, "l1", t1, "filters")
    ref.prox_(v, "group_lasso", t2, "filters")
    candidate = v.clone().requires_grad_()
    objective = lambda u: 0.5 * (u - w).pow(2).sum() + t1 * u.abs().sum() + t2 * u.norm()  # noqa: E731
    best = objective(candidate).item()
    for _ in range(200):  # no random perturbation does better
        trial = candidate.detach() + 1e-3 * torch.randn_like(w)
        assert objective(trial).item() >= best - 1e-12


def test_penalty_rule_adds_the_gradient_before_the_step(backend):
    model, x = _net(), _batch()
    expected = copy.deepcopy(model)
    rule = Rule(["0.weight", "2.weight"], penalty="group_lasso", strength=0.1)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule],
                          backend=backend)  # fmt: skip
    _backward(model, x)
    opt.step()
    _backward(expected, x)
    with torch.no_grad():
        weights = [expected[0].weight, expected[2].weight]
        for w, g in zip(weights, ref.penalty_grad(weights, "group_lasso", ("filters",))):
            w.grad += 0.1 * g
        for p in expected.parameters():
            p -= LR * p.grad
    for p, e in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


def test_penalty_on_blocks_goes_through_the_gradients_views(backend):
    model, x = _net(), _batch()
    expected = copy.deepcopy(model)
    rule = Rule(["0.weight", "5.weight"], penalty="group_lasso", strength=0.1, groups="blocks",
                block_size=3)  # fmt: skip
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule],
                          backend=backend)  # fmt: skip
    _backward(model, x)
    model[5].weight.grad = model[5].weight.grad.t().contiguous().t()  # no block view of this one
    opt.step()
    _backward(expected, x)
    with torch.no_grad():
        weights = [expected[0].weight, expected[5].weight]
        views = [w.view(-1, 3) for w in weights]
        for w, g in zip(weights, ref.penalty_grad(views, "group_lasso", ("filters",))):
            w.grad += 0.1 * g.view(w.shape)
        for p in expected.parameters():
            p -= LR * p.grad
    for p, e in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_target_keeps_the_largest_groups(scope, backend):
    model, x = _net(), _batch()
    names = ["0.weight", "2.weight", "5.weight"]
    rule = Rule(names, target=0.6, scope=scope)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule],
                          backend=backend)  # fmt: skip
    _backward(model, x)
    stepped = copy.deepcopy(model)
    for p, q in zip(stepped.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    torch.optim.SGD(stepped.parameters(), lr=LR).step()
    opt.step()
    weights = [model.get_parameter(n) for n in names]
    before = [stepped.get_parameter(n) for n in names]
    norms = [ref.group_norms([w], "filters")[0] for w in before]
    if scope == "layer":
        for w, b, n in zip(weights, before, norms):
            keep = math.ceil(0.4 * n.numel())
            alive = ref.group_norms([w], "filters")[0] > 0
            assert int(alive.sum()) == keep
            assert torch.equal(alive, n >= n.topk(keep).values.min())
            torch.testing.assert_close(w[alive], b[alive], rtol=0, atol=0)
    else:
        flat = torch.cat(norms)
        keep = math.ceil(0.4 * flat.numel())
        cut = flat.topk(keep).values.min()
        alive = torch.cat([ref.group_norms([w], "filters")[0] > 0 for w in weights])
        assert int(alive.sum()) == keep
        assert torch.equal(alive, flat >= cut)


def test_target_ramp_and_warmup():
    model, x = _net(), _batch()
    rule = Rule(["0.weight", "2.weight", "5.weight"], target=0.75, ramp_steps=4)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule],
                          warmup_steps=2)  # fmt: skip
    seen = []
    for _ in range(8):
        _backward(model, x)
        opt.step()
        opt.zero_grad()
        seen.append({n: round(v, 4) for n, v in opt.sparsity().items()}["5.weight"])
    # 16 groups: none dead during the warmup, then ceil-kept groups by the cubic ramp
    expected = [0.0, 0.0] + [1 - math.ceil((1 - rule.sparsity(t)) * 16) / 16 for t in range(6)]
    assert seen == pytest.approx(expected, abs=1e-4)


def test_warmup_steps_are_plain_optimizer_steps():
    model, x = _net(), _batch()
    plain = copy.deepcopy(model)
    rule = Rule(prox="group_lasso", strength=1.0 / LR)  # kills every group once active
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model,
                          [rule], warmup_steps=3)  # fmt: skip
    plain_opt = torch.optim.SGD(plain.parameters(), lr=LR, momentum=0.9)
    for step in range(4):
        for m, o in ((model, opt), (plain, plain_opt)):
            _backward(m, x)
            o.step()
            o.zero_grad()
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
        assert same == (step < 3)
    assert opt.sparsity()["total"] > 0.9


def test_prox_every_n_steps_uses_the_summed_learning_rates():
    model, x = _net(), _batch()
    expected = copy.deepcopy(model)
    strength = _threshold_for(model, ["0.weight"], "filters", 0.2) / 3
    rule = Rule("0.weight", prox="group_lasso", strength=strength)
    lrs = [LR, LR / 2, LR / 4, LR / 8]
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule], every=3)
    ref_opt = torch.optim.SGD(expected.parameters(), lr=LR)
    for step, lr in enumerate(lrs):
        for group in opt.param_groups + ref_opt.param_groups:
            group["lr"] = lr
        for m, o in ((model, opt), (expected, ref_opt)):
            _backward(m, x)
            o.step()
            o.zero_grad()
        if step == 0:  # prox at the first active step, then at step 3 with lr_1 + lr_2 + lr_3
            ref.prox_([expected[0].weight.data], "group_lasso", strength * lrs[0], "filters")
        if step == 3:
            ref.prox_([expected[0].weight.data], "group_lasso", strength * sum(lrs[1:]), "filters")
        for p, e in zip(model.parameters(), expected.parameters()):
            torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, weight_decay=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=LR),
        lambda ps: torch.optim.Adam(ps, lr=LR, foreach=False),
    ],
    ids=["sgd-momentum", "adamw", "adam-loop"],
)
@pytest.mark.parametrize("heal_elements", [False, True], ids=["groups", "elements"])
def test_healing_keeps_zeros_frozen(make_opt, heal_elements, backend):
    model, x = _net(), _batch()
    names = ["0.weight", "2.weight"]
    rule = Rule(names, prox="group_lasso", strength=_threshold_for(model, names, "filters", 0.5))
    opt = SparseOptimizer(make_opt(model.parameters()), model, [rule], heal_from=2,
                          heal_elements=heal_elements, backend=backend)  # fmt: skip
    for step in range(7):
        _backward(model, x)
        opt.step()
        if step == 1:
            frozen = [model.get_parameter(n).detach() == 0 for n in names]
            assert any(f.any() for f in frozen)
        if step >= 2:
            for n, f in zip(names, frozen):
                p = model.get_parameter(n)
                assert torch.equal(p[f], torch.zeros_like(p[f]))  # zero although moved
                assert torch.equal(p.grad[f], torch.zeros_like(p.grad[f]))
                assert (p[~f] != 0).all()  # the rest heals freely
        opt.zero_grad()


def test_healing_coupled_groups_stay_zero_and_prune_removes_them():
    model, x = coupled_models()[1]
    model, x = model.double(), x.double()
    norms = torch.cat(ref.coupled_group_norms(fs.coupled_groups(model, x)))
    rule = Rule(prox="group_l0", groups="coupled", strength=torch.quantile(norms, 0.3).item() / LR)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model,
                          [rule], example_inputs=x, heal_from=1)  # fmt: skip
    groups = [cg for t in opt.sparsifier.targets for cg in t.coupled]
    for step in range(4):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        dead = torch.cat([n == 0 for n in ref.coupled_group_norms(groups)])
        if step == 0:
            first = dead
        assert torch.equal(dead, first)
    assert 0 < int(first.sum()) < norms.numel()
    model.eval()
    pruned = fs.prune(copy.deepcopy(model), x, threshold=0.0)
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-10)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def _train(model, opt, x, steps, sched=None):
    for _ in range(steps):
        _backward(model, x)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _sparse_run(model, strength):
    rules = [
        Rule(["0.weight", "2.weight"], prox="group_lasso", strength=strength),
        Rule("5.weight", target=0.5, ramp_steps=4),
    ]
    opt = SparseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, rules,
                          warmup_steps=1, every=2, heal_from=6)  # fmt: skip
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return opt, sched


def test_resume_equals_uninterrupted_run():
    x = _batch()
    model = _net()
    resumed_model = copy.deepcopy(model)
    strength = _threshold_for(model, ["0.weight", "2.weight"], "filters", 0.3, lr=1e-2)
    opt, sched = _sparse_run(model, strength)
    _train(model, opt, x, 9, sched)

    opt_a, sched_a = _sparse_run(resumed_model, strength)
    _train(resumed_model, opt_a, x, 5, sched_a)  # stop mid prox-interval, before healing
    buffer = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "opt": opt_a.state_dict(),
                "sched": sched_a.state_dict()}, buffer)  # fmt: skip
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = _net(seed=7)  # other weights: everything must come from the checkpoint
    fresh.load_state_dict(saved["model"])
    opt_b, sched_b = _sparse_run(fresh, strength)
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    _train(fresh, opt_b, x, 4, sched_b)
    assert opt_b.steps == opt.steps == 9
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_clipping_and_scheduler_compose():
    x = _batch(torch.float32)
    model = _net(torch.float32)
    expected = copy.deepcopy(model)
    rule = Rule(["0.weight", "2.weight"], penalty="group_lasso", strength=0.05)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model, [rule])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ref_opt = torch.optim.SGD(expected.parameters(), lr=LR, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref_opt, gamma=0.9)
    reg = fs.Regularizer([expected[0].weight, expected[2].weight], "group_lasso", 0.05)
    for _ in range(3):
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()

        expected(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(expected.parameters(), 0.5)
        reg.apply_()
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * 0.9**3)
    for p, e in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)


def test_skipped_grad_scaler_steps_skip_the_rules():
    model, x = _net(torch.float32), _batch(torch.float32)
    rule = Rule(prox="group_lasso", strength=1.0 / LR)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule])
    scaler = torch.amp.GradScaler("cpu")
    before = copy.deepcopy(model.state_dict())
    scaler.scale(model(x).sum() * float("inf")).backward()
    scaler.step(opt)  # inf gradients: the scaler skips the step, and with it the rules
    assert opt.steps == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=True),
        lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, foreach=True),
        lambda ps: torch.optim.RMSprop(ps, lr=LR),
    ],
    ids=["adamw-foreach", "adamw-fused", "sgd-foreach", "rmsprop"],
)
def test_wraps_any_optimizer(make_opt):
    model, x = _net(torch.float32), _batch(torch.float32)
    rule = Rule(["0.weight", "2.weight"], target=0.5)
    base = make_opt(model.parameters())
    opt = SparseOptimizer(base, model, [rule])
    _train(model, opt, x, 2)
    assert opt.sparsity() == {"0.weight": 0.5, "2.weight": 0.5, "total": 0.5}
    assert opt.state is base.state and opt.param_groups is base.param_groups
    assert len(base.state) == len(list(model.parameters()))


def test_lbfgs_steps_with_the_penalty_in_every_closure_evaluation():
    # LBFGS needs its closure and evaluates it several times; each evaluation must see the
    # penalty, exactly as if the closure itself added strength * R to its loss.
    strength = 1e-2
    runs = []
    for wrapped in (True, False):
        model, x = _net(torch.float64), _batch(torch.float64)
        weights = [model[0].weight, model[2].weight]
        base = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        rule = Rule(["0.weight", "2.weight"], penalty="l1l2", strength=strength)
        opt = SparseOptimizer(base, model, [rule]) if wrapped else base
        calls = []

        def closure(model=model, x=x, weights=weights, wrapped=wrapped, opt=opt, calls=calls):
            calls.append(1)
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            if not wrapped:
                loss = loss + strength * sum(ref.penalty(w, "l1l2") for w in weights)
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        runs.append((model, len(calls)))
    (ours, n_ours), (expected, n_expected) = runs
    assert n_ours == n_expected > 2
    for p, q in zip(ours.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_closure_is_evaluated_once():
    model, x = _net(), _batch()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model,
                          [Rule(penalty="l1", strength=1e-3)])  # fmt: skip
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and loss.ndim == 0


def test_transformer_heads_and_neurons_rules():
    pytest.importorskip("transformers")
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    rules = [
        Rule(r".*self_attn\..*", target=0.5, groups="heads"),
        Rule(r".*mlp\..*", target=0.25, groups="neurons"),
    ]
    opt = SparseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, rules)
    model(ids, labels=ids).loss.backward()
    opt.step()
    report = opt.sparsity()
    heads = [v for k, v in report.items() if "self_attn" in k]
    neurons = [v for k, v in report.items() if "mlp" in k]
    assert heads == [0.5, 0.5] and neurons == [0.25, 0.25]
    pruned = fs.prune(copy.deepcopy(model), ids, threshold=0.0)
    assert pruned.config.intermediate_size != model.config.intermediate_size or any(
        block.mlp.down_proj.in_features == 36 for block in pruned.model.layers
    )
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: SparseOptimizer(object(), m, [Rule(prox="l1")]), TypeError, "torch.optim"),
        (
            lambda m: SparseOptimizer(
                torch.optim.SGD(m.parameters(), lr=LR), object(), [Rule(prox="l1")]
            ),
            TypeError,
            "nn.Module",
        ),  # fmt: skip
        (
            lambda m: SparseOptimizer(torch.optim.SGD(m.parameters(), lr=LR), m, []),
            ValueError,
            "at least one",
        ),  # fmt: skip
        (
            lambda m: SparseOptimizer(
                torch.optim.SGD(m.parameters(), lr=LR), m, [Rule(prox="l1")], every=0
            ),
            ValueError,
            "every",
        ),  # fmt: skip
        (
            lambda m: SparseOptimizer(
                torch.optim.SGD(m.parameters(), lr=LR),
                m,
                [Rule(prox="l1")],
                warmup_steps=5,
                heal_from=2,
            ),
            ValueError,
            "heal_from",
        ),  # fmt: skip
    ],
)
def test_bad_arguments_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call(_net())


def test_wrapping_twice_is_refused():
    model = _net()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [Rule(prox="l1")])
    with pytest.raises(TypeError, match="already a SparseOptimizer"):
        SparseOptimizer(opt, model, [Rule(prox="l1")])


def test_foreign_state_dicts_are_refused_and_change_nothing():
    model, x = _net(), _batch()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model,
                          [Rule(prox="l1", strength=1e-3)])  # fmt: skip
    _train(model, opt, x, 2)
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="not a SparseOptimizer state dict"):
        opt.load_state_dict(opt.optimizer.state_dict())
    other = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model,
                            [Rule("0.weight", prox="l1"), Rule("2.weight", prox="l0")])  # fmt: skip
    with pytest.raises(ValueError, match="other rules"):
        other.load_state_dict(saved)
    assert other.steps == 0
    fewer = SparseOptimizer(torch.optim.SGD([model[0].weight], lr=LR), model,
                            [Rule("0.weight", prox="l1")])  # fmt: skip
    state = {"optimizer": saved["optimizer"], "sparsity": fewer.state_dict()["sparsity"]}
    state["sparsity"]["steps"] = 5
    with pytest.raises(ValueError):
        fewer.load_state_dict(state)  # the wrapped optimizer refuses: the rules' state is kept
    assert fewer.steps == 0


def test_exported_from_the_package_and_printed():
    assert fs.SparseOptimizer is SparseOptimizer and fs.Rule is Rule
    model = _net()
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [Rule(prox="l1")])
    text = repr(opt)
    assert text.startswith("SparseOptimizer(") and "SGD" in text and "prox='l1'" in text


STEPS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, nesterov=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=LR),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.5, dampening=0.3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=1e-2),
    "adam-wd": lambda ps: torch.optim.Adam(ps, lr=LR, weight_decay=1e-2),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("optimizer", list(STEPS))
@pytest.mark.parametrize("kind", ["group_lasso", "group_l0", "l1", "l0_group_lasso"])
def test_fused_step_equals_the_step_then_the_prox(kind, optimizer, dtype, monkeypatch):
    import fastsparse.optim.optimizer as optimizer_module

    calls = []
    family = AdamStepOptions if optimizer.startswith("adam") else SGDStepOptions
    real = optimizer_module.step_prox_

    def counted(params, kind, threshold, options, *args, **kwargs):
        assert type(options) is family  # built once, from the param group, and passed on
        calls.append(real(params, kind, threshold, options, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(optimizer_module, "step_prox_", counted)
    x = _batch(dtype)
    runs = []
    for fuse in (True, False):
        model = _net(dtype)
        names = ["0.weight", "2.weight", "5.weight"]
        strength = _threshold_for(model, names, "filters", 0.3) / 4
        if kind == "l1":
            strength = 0.002 / LR
        if kind == "l0_group_lasso":
            strength = (0.002 / LR, strength)
        rule = Rule(names, prox=kind, strength=strength)
        opt = SparseOptimizer(STEPS[optimizer](model.parameters()), model, [rule],
                              fuse_step=fuse, every=2)  # fmt: skip
        _train(model, opt, x, 5)
        runs.append((model, opt))
    assert len(calls) == 3 and all(c is not None for c in calls)  # steps 0, 2, 4 fused
    (fused, fused_opt), (plain, plain_opt) = runs
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)
        a, b = fused_opt.state[p], plain_opt.state[q]
        assert a.keys() == b.keys(), name
        for key in a:
            if a[key] is None or b[key] is None:
                assert a[key] is b[key] is None
                continue
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=f"{name} {key}")
    assert fused_opt.sparsity() == plain_opt.sparsity()


def test_fused_step_falls_back_where_no_kernel_serves():
    model = _net(torch.float32)
    model[0].to(torch.bfloat16)  # bf16 weights: no fused pass, the step and the prox apart
    expected = copy.deepcopy(model)
    rule = Rule(["0.weight", "2.weight"], prox="group_lasso", strength=0.1)
    opts = [
        SparseOptimizer(
            torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9), m, [rule], fuse_step=fuse
        )  # fmt: skip
        for m, fuse in ((model, True), (expected, False))
    ]
    for m, opt in zip((model, expected), opts):
        for _ in range(2):
            m[0].weight.grad = torch.ones_like(m[0].weight)
            m[2].weight.grad = torch.ones_like(m[2].weight)
            opt.step()
            opt.zero_grad()
    for p, q in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-6)


def test_deepcopy_and_pickle_keep_the_rules_and_state(tmp_path):
    model, x = _net(), _batch()
    rule = Rule(["0.weight", "2.weight"], prox="group_lasso", strength=0.1)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), model, [rule])
    _train(model, opt, x, 2)
    twin = copy.deepcopy(opt)
    assert twin.steps == 2 and twin.rules == opt.rules
    assert twin.optimizer is not opt.optimizer and len(twin.state) == len(opt.state)
    torch.save(opt, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=False)
    assert loaded.steps == 2 and len(loaded.param_groups[0]["params"]) == len(
        opt.param_groups[0]["params"]
    )


def test_fused_steps_refuse_what_torch_refuses():
    from fastsparse.functional import adam_prox_, sgd_prox_

    w = torch.randn(4, 3, requires_grad=True)
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError, match="Nesterov"):
        sgd_prox_([w], "group_lasso", 0.1, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        adam_prox_([w], "group_lasso", 0.1, lr=0.1, step=1, exp_avgs=[w], exp_avg_sqs=[w],
                   betas=(0.9, 1.5))  # fmt: skip
    with pytest.raises(ValueError, match="scope"):
        Rule(prox="l1", scope="model")


def test_healing_masks_of_other_rules_are_refused():
    model, x = _net(), _batch()
    rule = Rule(["0.weight", "2.weight"], prox="group_lasso", strength=1.0)
    opt = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule], heal_from=1)
    _train(model, opt, x, 2)
    other = SparseOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, [rule],
                            heal_from=1, heal_elements=True)  # fmt: skip
    with pytest.raises(ValueError, match="healing masks"):
        other.load_state_dict(opt.state_dict())
