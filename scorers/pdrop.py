"""PyramidDrop baseline, training-free (Xing et al., CVPR 2025): last-instruction-token attention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


@SCORERS.register("pdrop")
@dataclass
class PDrop(Scorer):
    """Score = head-mean attention from the last instruction token to each vision token, per stage."""

    def score(self, signals: Signals) -> Tensor:
        return signals.last_t2v
