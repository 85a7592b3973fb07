"""Random baseline: seeded uniform scores, the same draw for the same seed, stage and shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


@SCORERS.register("random")
@dataclass
class RandomScorer(Scorer):
    """Keeps a uniformly random subset of vision tokens; works at any location, -1 included."""

    needs_llm_attention = False

    seed: int = 0

    def score(self, signals: Signals) -> Tensor:
        vision = signals.layout.vision  # [B, V]
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1009 + signals.stage)
        return torch.rand(vision.shape, generator=generator).to(vision.device)
