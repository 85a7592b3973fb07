"""Text-token dynamics (AdaptInfer Figure 2): do the key question tokens change from layer to layer?

Per layer, the importance of question token i is the attention it receives from the question
(Eq. 1, ``Imp_l(t_i) = sum_j A_t2t[j, i]``); the top 20% are that layer's key tokens. The mean
over samples of the pairwise IoU of these sets between layers is the matrix of Figure 2.
Aggregated as samples arrive: memory does not depend on the number of samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from research.pruning.signals import Signals


def top_fraction_mask(scores: Tensor, valid: Tensor, fraction: float) -> Tensor:
    """[B, T] bool: each row's top ``ceil(fraction * valid count)`` valid entries of ``scores`` [B, T]."""
    k = (valid.sum(1).float() * fraction).ceil().clamp(min=1).long()  # [B]
    ranked = scores.float().masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(scores.shape[1]).expand_as(ranked))
    return (rank < k[:, None]) & valid


def iou_matrix(masks: Tensor) -> Tensor:
    """[B, L, L] IoU between the boolean sets ``masks`` [B, L, T] of every pair of layers."""
    m = masks.float()
    inter = torch.einsum("blt,bmt->blm", m, m)
    sizes = m.sum(-1)
    union = sizes[:, :, None] + sizes[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


class TextDynamics:
    """Observer: accumulates the mean IoU matrix of the top-``fraction`` question tokens across layers."""

    def __init__(self, num_layers: int, fraction: float = 0.2) -> None:
        self.num_layers, self.fraction = num_layers, fraction
        self.iou_sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.samples = 0
        self._layers: dict[int, Tensor] = {}  # this forward's per-layer key-token masks

    def __call__(self, signals: Signals) -> None:
        importance = signals.t2t.sum(1)  # [B, T]  Eq. 1: attention each question token receives
        self._layers[signals.layer_idx] = top_fraction_mask(importance, signals.text_valid, self.fraction).cpu()
        if len(self._layers) == self.num_layers:  # the forward's last observed layer: fold it in
            masks = torch.stack([self._layers[i] for i in range(self.num_layers)], 1)  # [B, L, T]
            self.iou_sum += iou_matrix(masks).sum(0).double()
            self.samples += masks.shape[0]
            self._layers.clear()

    def matrix(self) -> np.ndarray:
        """[L, L] mean IoU over the samples seen."""
        return (self.iou_sum / max(1, self.samples)).numpy()

    def off_diagonal_mean(self) -> float:
        m = self.matrix()
        n = m.shape[0]
        return float((m.sum() - np.trace(m)) / max(1, n * n - n)) if n > 1 else math.nan

    def adjacent_mean(self) -> float:
        """Mean IoU between consecutive layers (``l``, ``l + 1``): how much the key question tokens move per layer."""
        m = self.matrix()
        return float(np.diagonal(m, 1).mean()) if m.shape[0] > 1 else math.nan
