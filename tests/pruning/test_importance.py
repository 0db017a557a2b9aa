"""Channel selection (fastsparse.pruning.importance): choosing channels by ratio or threshold,
and zeroing every member slice of the chosen channels' coupled groups."""

import pytest
import torch

from fastsparse.core.groups import CoupledGroup, CoupledMember
from fastsparse.pruning.importance import select_channels, zero_channels_


def test_select_channels_ratio_threshold_and_ties():
    scores = [torch.tensor([0.5, 0.1, 0.9]), None, torch.tensor([0.1, 0.7])]
    dead = select_channels(scores, ratio=0.4)  # 2 of 5; tie at 0.1 broken by order
    assert [d.tolist() for d in dead] == [[False, True, False], [], [True, False]]
    dead = select_channels(scores, threshold=0.5)
    assert [d.tolist() for d in dead] == [[True, True, False], [], [True, False]]
    assert [d.tolist() for d in select_channels(scores, ratio=0.0)][0] == [False] * 3
    with pytest.raises(ValueError, match="exactly one"):
        select_channels(scores)
    with pytest.raises(ValueError, match="ratio"):
        select_channels(scores, ratio=2.0)


def test_zero_channels_touches_every_member_slice():
    a, b = torch.ones(4, 3), torch.ones(2, 4, 5)
    members = (
        CoupledMember("a", a, 0, torch.arange(4), torch.arange(4)),
        CoupledMember("b", b, 1, torch.arange(4), torch.tensor([0, 1, 2, 3])),
    )
    group = CoupledGroup("a", 4, members)
    assert zero_channels_([group], [torch.tensor([False, True, False, True])]) == 2
    assert a.sum(dim=1).tolist() == [3.0, 0.0, 3.0, 0.0]
    assert b.sum(dim=(0, 2)).tolist() == [10.0, 0.0, 10.0, 0.0]
    with pytest.raises(ValueError, match="masks"):
        zero_channels_([group], [])
