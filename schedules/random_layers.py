"""Random-layer baseline (paper Table 5): a seeded draw of pruning layers.

The paper's five draws for a 32-layer LLaMA were {3}, {2,15}, {2,8,16}, {2,4,8,16}, {3,6,23}.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from schedules.base import SCHEDULES, Schedule


@SCHEDULES.register("random")
@dataclass
class RandomLayers(Schedule):
    """Draws a number of stages in ``[1, max_stages]`` (at most ``num_layers - 2``), then that many
    distinct layers in ``[1, num_layers - 2]``; the same seed and ``num_layers`` give the same draw."""

    seed: int = 0
    max_stages: int = 4

    def propose(self, num_layers: int) -> list[int]:
        candidates = range(1, num_layers - 1)
        if self.max_stages < 1 or not candidates:
            raise ValueError(
                f"random schedule needs max_stages >= 1 and num_layers >= 3, "
                f"got max_stages={self.max_stages}, num_layers={num_layers}"
            )
        rng = random.Random(self.seed)  # never the global state
        num_stages = rng.randint(1, min(self.max_stages, len(candidates)))
        return sorted(rng.sample(candidates, num_stages))
