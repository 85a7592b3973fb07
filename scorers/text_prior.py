"""AdaptInfer's dynamic text-guided scorer (Zhang et al., AdaptInfer, Eq. 2-4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


def text_prior_scores(t2t: Tensor, t2v: Tensor) -> Tensor:
    """Eq. 2-3: ``w = sum_i A_t2t[i, :]`` (attention each text token receives), ``s = w^T A_t2v``.

    Args: t2t [B, T, T] text-to-text attention (rows = queries); t2v [B, T, V].
    Returns: [B, V] vision-token scores (Eq. 4 keeps their top-k).
    """
    prior = t2t.sum(dim=1)  # [B, T]  Eq. 2
    return torch.einsum("bt,btv->bv", prior, t2v)  # Eq. 3


@SCORERS.register("text_prior")
@dataclass
class TextPrior(Scorer):
    """At each pruning layer, re-weight the question tokens' t2v attention by their t2t prior."""

    def score(self, signals: Signals) -> Tensor:
        return text_prior_scores(signals.t2t, signals.t2v)
