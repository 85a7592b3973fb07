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

    ``prune_before=True`` reads the list as the first layers to run on the kept tokens (PyramidDrop's
    ``layer_list`` and FastV's K): prune after ``x - 1``. With ``scale_from`` it is that boundary which
    is rescaled, so PyramidDrop's [8, 16, 24] of 32 stays four equal stages at any depth: locations
    [7, 15, 23] of 32, [1, 3, 5] of 8.
    """

    allows_interface = True

    layers: list[int] = field(default_factory=lambda: [1, 10, 20])
    scale_from: int | None = None  # depth the list was chosen for: rescale it to the model's depth
    prune_before: bool = False  # the listed layers are the first pruned ones (location = layer - 1)

    def propose(self, num_layers: int) -> list[int]:
        shift = 1 if self.prune_before else 0
        if self.scale_from is None:
            return [int(x) - shift for x in self.layers]
        # proportional, rounded half up: the paper's [1, 10, 20] of 32 layers -> [0, 3, 5] of 8, [1, 5, 10] of 16
        scaled = [int(x) if x < 0 else int(x * num_layers / self.scale_from + 0.5) for x in self.layers]
        return sorted({x - shift for x in scaled})
