"""Timings the demo prints: measured in turn (so a passing load slows both sides alike), with a
note when the repeats show that the machine was busy."""

import dataclasses
import io
import itertools

from fastsparse.workflow.config import RunConfig
from fastsparse.workflow.reports import print_demo
from fastsparse.workflow.run import load_data, run
from fastsparse.workflow.timing import interleaved_medians, spread


def test_spread():
    assert spread([1.0] * 10) == 1.0
    assert spread([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]) == 2.0
    assert spread([1.0, 5.0]) == 1.0  # too few repeats to say


def test_interleaved_ratios_survive_a_load_that_comes_and_goes(monkeypatch):
    clock = itertools.count()
    now = [0.0]
    monkeypatch.setattr("fastsparse.workflow.timing.time.perf_counter", lambda: now[0])

    def work(cost):
        def call():
            busy = 10.0 if 8 <= next(clock) < 20 else 1.0  # a load during a third of the calls
            now[0] += cost * busy

        return call

    (fast, slow), spreads = interleaved_medians([work(1.0), work(4.0)], repeats=15, warmup=0)
    assert slow / fast == 4.0
    # Timed one after the other, the same load would have fallen on one side only.
    assert max(spreads) > 1.0


def test_demo_says_when_the_machine_was_busy():
    config = RunConfig(kind="group_l1l2", epochs=1, train_samples=256, test_samples=200)
    data = load_data(config)
    result = run(config, data=data, progress=False, inference_repeats=2)
    quiet, busy = io.StringIO(), io.StringIO()
    print_demo(dataclasses.replace(result, timing_spread=1.0), data, out=quiet)
    print_demo(dataclasses.replace(result, timing_spread=2.0), data, out=busy)
    assert "the machine was busy" not in quiet.getvalue()
    assert "the machine was busy" in busy.getvalue() and "varied by 100%" in busy.getvalue()
