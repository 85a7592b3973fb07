"""One timer for the engine's scoring time and evaluation's latencies (research/pruning/timing.py)."""

from __future__ import annotations

import torch

import research.evaluation
import research.pruning.engine
from research.pruning import timing
from research.pruning.timing import Timer


def test_a_timer_sums_its_spans_and_is_the_one_the_engine_and_evaluation_use(monkeypatch):
    ticks = iter([1.0, 3.0, 10.0, 11.5])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    timer = Timer()
    for _ in range(2):
        with timer.span(torch.device("cpu")):
            pass
    assert timer.seconds == 3.5
    assert research.pruning.engine.Timer is Timer and research.evaluation.Timer is Timer
    assert not hasattr(research.pruning.engine, "_Timer") and not hasattr(research.evaluation, "_Clock")
