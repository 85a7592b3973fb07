"""Attention shifts (AdaptInfer Figure 3 and Appendix A): at which layers does attention to the key
vision tokens change regime?

Per sample, the key vision tokens are the top 10% by total attention received from the question
over all layers in prefill. For each, the per-layer attention curve ``a`` (Eq. 8) is cumulated
(Eq. 9) and one change point is found by binary segmentation with an l2 cost (Eq. 10,
``ruptures.Binseg(model="l2", jump=1)``). The histogram of change points over layers is the figure;
it is accumulated as samples arrive (memory independent of their number).

Observed on a pruned model (``research.analysis.per_combination``), the curves stay over every image token: a
token pruned at a layer receives no attention in the layers after it (it is no longer in the sequence), so its
attention is 0 there and its cumulative curve flat.
"""

from __future__ import annotations

import numpy as np
import ruptures
import torch
from torch import Tensor

from research.pruning.signals import Signals


def shift_layer(curve: np.ndarray) -> int:
    """The layer after which a cumulative attention curve ``curve`` [L] changes regime.

    ruptures returns the breakpoint ``b``: the first index of the second segment (its first
    segment is ``curve[:b]``). The returned value is ``b - 1``: the last layer (0-indexed) of the
    first regime, i.e. the location to prune *after* in this project's convention (location ``l``
    = after decoder layer ``l``). With ruptures' minimum segment length of 2, it lies in
    ``1 .. L-3``; the paper's "layer 1" spike is ``b = 2``.
    """
    signal = np.asarray(curve, dtype=np.float64).reshape(-1, 1)
    breakpoint_ = ruptures.Binseg(model="l2", jump=1).fit(signal).predict(n_bkps=1)[0]
    return int(breakpoint_) - 1


def received_in_patch_order(signals: Signals) -> Tensor:
    """[B, V] attention each of the image's tokens receives from the question at this layer, in patch order over
    the image's tokens before any pruning (``V``: the batch's count then). A token already pruned receives
    nothing: 0. Unpruned, this is ``signals.t2v.sum(1)``."""
    layout = signals.layout
    received = signals.t2v.sum(1).float()  # [B, V_l] over the tokens this layer runs on
    valid = getattr(layout, "vision_valid", None)  # rows with fewer image tokens than the batch's largest
    if valid is not None:
        received = received * valid
    width = signals.interface.layout.vision.shape[1] if signals.interface is not None else received.shape[1]
    return received.new_zeros(received.shape[0], width).scatter_add_(1, layout.vision_rank, received)


class AttentionShifts:
    """Observer: histogram over layers of the shift layers of each sample's key vision tokens."""

    def __init__(self, num_layers: int, fraction: float = 0.1) -> None:
        self.num_layers, self.fraction = num_layers, fraction
        self.histogram = np.zeros(num_layers, dtype=np.int64)
        self.samples = 0
        self._layers: dict[int, Tensor] = {}  # this forward's per-layer [B, V] attention received, in patch order

    def __call__(self, signals: Signals) -> None:
        self._layers[signals.layer_idx] = received_in_patch_order(signals).cpu()
        if len(self._layers) == self.num_layers:
            curves = torch.stack([self._layers[i] for i in range(self.num_layers)], -1)  # [B, V, L]  Eq. 8
            self._layers.clear()
            self.add(curves.numpy())

    def add(self, curves: np.ndarray) -> None:
        """Fold in per-sample attention curves [B, V, L] (not yet cumulated)."""
        batch, num_vision, _ = curves.shape
        k = max(1, round(self.fraction * num_vision))
        for sample in curves:
            key_tokens = np.argsort(-sample.sum(-1), kind="stable")[:k]  # top 10% by total attention
            for curve in np.cumsum(sample[key_tokens], axis=-1):  # Eq. 9
                self.histogram[shift_layer(curve)] += 1
        self.samples += batch
