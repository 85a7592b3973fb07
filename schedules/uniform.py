"""Uniform baseline (paper Table 5): ``num_stages`` locations ``start + i * step``."""

from __future__ import annotations

from dataclasses import dataclass

from schedules.base import SCHEDULES, Schedule


@SCHEDULES.register("uniform")
@dataclass
class Uniform(Schedule):
    """Evenly spaced locations; ``step`` defaults to ``(num_layers - start) // num_stages``.

    32 layers: defaults give [2, 12, 22]; ``num_stages=4, start=0, step=9`` gives [0, 9, 18, 27].
    """

    num_stages: int = 3
    start: int = 2
    step: int | None = None

    def propose(self, num_layers: int) -> list[int]:
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        step = (num_layers - self.start) // self.num_stages if self.step is None else self.step
        if step < 1:
            raise ValueError(
                f"uniform step {step} must be >= 1 (num_layers={num_layers}, start={self.start}, "
                f"num_stages={self.num_stages})"
            )
        return [self.start + i * step for i in range(self.num_stages)]
