"""After warm-up, the in-place paths and the Triton autograd path upload nothing and read nothing
back: no `torch.tensor` built on the host (a pageable host-to-device copy on a GPU, which a CUDA
graph capture refuses) and no `.item()` / `.tolist()` / `.cpu()` (a host sync), per call.
Counted by patching, on the CPU."""

import pytest
import torch

import fastsparse as fs


@pytest.fixture
def host_traffic(monkeypatch):
    """A counter of host-built tensors and host reads while it is armed."""
    counts = {"uploads": 0, "reads": 0, "armed": False}
    tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        counts["uploads"] += counts["armed"]
        return tensor(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", counting_tensor)
    for name in ("item", "tolist", "cpu"):
        method = getattr(torch.Tensor, name)

        def counting(self, *args, _method=method, **kwargs):
            counts["reads"] += counts["armed"]
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def _steady(counts, call, warmup=2, calls=3):
    for _ in range(warmup):
        call()
    counts["armed"] = True
    for _ in range(calls):
        call()
    counts["armed"] = False
    return counts["uploads"], counts["reads"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["group_lasso", "group_l1l2"])
def test_inplace_penalty_steady_state(kind, dtype, backend, device, host_traffic):
    if backend == "native" and dtype == torch.bfloat16:
        dtype = torch.float16  # the native backend takes both; keep one low-precision case each
    params = [torch.randn(s, dtype=dtype, device=device).requires_grad_(True)
              for s in [(16, 8, 3, 3), (16,), (10, 20000)]]  # fmt: skip
    for p in params:
        p.grad = torch.zeros_like(p)
    call = lambda: fs.add_penalty_grad_(params, kind, 1e-3, backend=backend)  # noqa: E731
    assert _steady(host_traffic, call) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["l1", "group_lasso"])
def test_prox_steady_state(kind, dtype, backend, device, host_traffic):
    weights = [torch.randn(s, dtype=dtype, device=device) for s in [(16, 8, 3, 3), (10, 20000)]]
    call = lambda: fs.prox_(weights, kind, 1e-3, backend=backend)  # noqa: E731
    assert _steady(host_traffic, call) == (0, 0)


def test_the_counter_sees_the_first_call(backend, device, host_traffic):
    # A cold plan builds its tables on the host: the patched counter must see that.
    params = [torch.randn(7, 5, 3, device=device).requires_grad_(True)]
    params[0].grad = torch.zeros_like(params[0])
    call = lambda: fs.add_penalty_grad_(params, "l1l2", 1e-3, backend=backend)  # noqa: E731
    uploads, _ = _steady(host_traffic, call, warmup=0, calls=1)
    assert uploads > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_call_and_regularizer_steady_state(dtype, backend, device, host_traffic):
    params = [torch.randn(s, dtype=dtype, device=device).requires_grad_(True)
              for s in [(16, 8, 3, 3), (16,), (10, 20000)]]  # fmt: skip
    for p in params:
        p.grad = torch.zeros_like(p)
    step = fs.functional.PreparedPenaltyGrad(params, "group_lasso", backend=backend)
    reg = fs.Regularizer(params, "l1l2", 1e-3, backend=backend)
    assert _steady(host_traffic, lambda: step(1e-3)) == (0, 0)
    assert _steady(host_traffic, reg.apply_) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("groups", ["filters", ("filters", "channels")], ids=str)
def test_autograd_penalty_steady_state(groups, dtype, device, host_traffic):
    """Forward and backward, fresh gradients every step (set_to_none), wherever the allocator
    puts them: the gradient table holds offsets within the backward's flat buffers. (The
    native backend's table holds absolute addresses: rebuilt per backward, no upload on a CPU.)
    """
    params = [torch.randn(s, dtype=dtype, device=device).requires_grad_(True)
              for s in [(16, 8, 3, 3), (16, 5), (10, 20000), (24, 40)]]  # fmt: skip
    keep = []  # earlier gradients stay alive, so new ones land elsewhere

    def step():
        fs.penalty(params, "group_lasso", groups=groups, backend="triton").backward()
        keep.append([p.grad for p in params])
        for p in params:
            p.grad = None

    assert _steady(host_traffic, step) == (0, 0)
    assert len({g[0].data_ptr() for g in keep}) == len(keep)  # every backward's own buffers


def test_alternating_gradients_keep_their_tables(backend, device, host_traffic):
    """Calls that alternate between two sets of gradients (as autograd and in-place calls on
    one plan do) upload each table once: a table stays while work launched with it (or a CUDA
    graph captured with it) may still read it."""
    params = [torch.randn(s, device=device).requires_grad_(True) for s in [(16, 8, 3, 3), (24, 40)]]
    sets = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    turn = [0]

    def call():
        turn[0] ^= 1
        for p, g in zip(params, sets[turn[0]]):
            p.grad = g
        fs.add_penalty_grad_(params, "group_lasso", 1e-3, backend=backend)

    assert _steady(host_traffic, call) == (0, 0)
