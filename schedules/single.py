"""Single-layer baseline (paper Table 5; FastV-style): prune once, after one decoder layer."""

from __future__ import annotations

from dataclasses import dataclass

from schedules.base import SCHEDULES, Schedule


@SCHEDULES.register("single")
@dataclass
class Single(Schedule):
    """Prunes once, after decoder layer ``layer``."""

    layer: int = 1

    def propose(self, num_layers: int) -> list[int]:
        return [self.layer]
