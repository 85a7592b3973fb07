"""Wall time of code spans on the device they run on (the engine's scoring time, evaluation's latencies)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch


class Timer:
    """The summed wall time of its spans: ``perf_counter`` on CPU; CUDA events on GPU, read (one synchronize)
    only when :attr:`seconds` is asked for, so timing does not stall the device in between."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def span(self, device: torch.device) -> Iterator[Timer]:
        """Time the ``with`` block's work on ``device``, added to :attr:`seconds`."""
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            yield self
            end.record()
            self._events.append((begin, end))
        else:
            start = time.perf_counter()
            yield self
            self._seconds += time.perf_counter() - start

    @property
    def seconds(self) -> float:
        if self._events:
            torch.cuda.synchronize()
            self._seconds += sum(begin.elapsed_time(end) for begin, end in self._events) / 1000.0
            self._events.clear()
        return self._seconds
