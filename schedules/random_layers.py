"""Random-layer baseline (paper Table 5): a seeded draw of pruning layers.

The paper's five draws for a 32-layer LLaMA were {3}, {2,15}, {2,8,16}, {2,4,8,16}, {3,6,23}: the
first pruning layer always early (the budget stays reachable: every layer before it keeps all tokens),
the others anywhere. This schedule draws the same way.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from schedules.base import SCHEDULES, Schedule


@SCHEDULES.register("random")
@dataclass
class RandomLayers(Schedule):
    """Draws a number of stages in ``[1, max_stages]`` (at most ``num_layers - 2``); the first layer in
    ``[1, max(1, round(first_within * num_layers))]``, the others distinct in ``(first, num_layers - 2]``.
    The same seed and ``num_layers`` give the same draw."""

    seed: int = 0
    max_stages: int = 4
    first_within: float = 0.1  # the first pruning layer lies in the first 10% of the depth (as the paper's draws)

    def propose(self, num_layers: int) -> list[int]:
        candidates = range(1, num_layers - 1)
        if self.max_stages < 1 or not candidates:
            raise ValueError(
                f"random schedule needs max_stages >= 1 and num_layers >= 3, "
                f"got max_stages={self.max_stages}, num_layers={num_layers}"
            )
        rng = random.Random(self.seed)  # never the global state
        num_stages = rng.randint(1, min(self.max_stages, len(candidates)))
        first = rng.randint(1, min(max(1, round(self.first_within * num_layers)), num_layers - 2))
        rest = range(first + 1, num_layers - 1)
        return [first, *sorted(rng.sample(rest, min(num_stages - 1, len(rest))))]
