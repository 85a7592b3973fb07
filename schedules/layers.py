"""Explicit list of pruning locations; AdaptInfer's (paper Sec. 3.3) is [1, 10, 20] for a 32-layer LLaMA."""

from __future__ import annotations

from dataclasses import dataclass, field

from schedules.base import SCHEDULES, Schedule


@SCHEDULES.register("layers")
@dataclass
class Layers(Schedule):
    """Prunes after each listed layer; ``-1`` prunes before the LLM (ATP-style).

    The default is the paper's LLaVA-1.5-7B schedule and needs at least 21 layers
    (the paper reads [1, 11, 22] off the 40-layer LLaVA-1.5-13B histogram).
    """

    allows_interface = True

    layers: list[int] = field(default_factory=lambda: [1, 10, 20])

    def propose(self, num_layers: int) -> list[int]:
        return [int(x) for x in self.layers]
