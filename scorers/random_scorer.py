"""Random baseline: seeded uniform scores, the same draw for the same seed and stage, whatever the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


@SCORERS.register("random")
@dataclass
class RandomScorer(Scorer):
    """Keeps a uniformly random subset of vision tokens; works at any location, -1 included.

    One draw per (seed, stage), indexed by each token's place among its image's tokens (``vision_rank``):
    a row keeps the same tokens in any batch as alone (a [B, V] draw would give row i the i-th slice).
    """

    needs_llm_attention = False

    seed: int = 0

    def score(self, signals: Signals) -> Tensor:
        rank = signals.layout.vision_rank  # [B, V] each token's index among its image's tokens
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1009 + signals.stage)
        # CPU draws are sequential: a longer draw starts with the shorter one, so the table's length
        # (the batch's largest rank) does not change any row's scores.
        table = torch.rand(int(rank.max()) + 1, generator=generator).to(rank.device)
        return table[rank]
