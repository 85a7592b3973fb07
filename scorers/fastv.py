"""FastV baseline (Chen et al., ECCV 2024): attention received from all queries at the layer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


@SCORERS.register("fastv")
@dataclass
class FastV(Scorer):
    """Score = mean over heads and over every (non-padding) query of the attention to the token."""

    def score(self, signals: Signals) -> Tensor:
        return signals.all_t2v
