"""torch.compile(fullgraph=True) with fastsparse's first call inside the compiled function, in a
fresh process (the backend probe must not be traced), and with coupled groups."""

import subprocess
import sys
import textwrap

import pytest

COLD = """
import torch, fastsparse as fs
from torch._dynamo.utils import counters
w = torch.randn(8, 4, 3, 3, requires_grad=True)
value = torch.compile(lambda w: fs.penalty(w, "group_lasso"), fullgraph=True)(w)
torch.testing.assert_close(value, fs.reference.penalty(w, "group_lasso"))
torch._dynamo.reset(); counters.clear()
torch.compile(lambda w: fs.penalty(w, "l1l2"))(w.detach())
assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
print("ok")
"""

COUPLED = """
import torch, fastsparse as fs
from torch import nn
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                      nn.Linear(64, 3))
x = torch.randn(2, 1, 8, 8)
groups = fs.coupled_groups(model, x)
step = torch.compile(lambda x: fs.penalty(None, "group_lasso", groups=groups), fullgraph=True)
torch.testing.assert_close(step(x), fs.reference.coupled_penalty(groups, "group_lasso"))
print("ok")
"""


@pytest.mark.parametrize("script", [COLD, COUPLED], ids=["cold", "coupled"])
def test_fullgraph_in_a_fresh_process(script):
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
