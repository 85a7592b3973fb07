"""Self-adaptive cross-modal mixture (``papers/cross-modal-mixture-abstract.txt``), training-free.

Signals over the remaining vision tokens, each turned into a distribution ``p_i`` over tokens:

1. visual saliency: the vision tower's CLS-to-patch attention;
2. text-image similarity: for each vision token, the mean over question tokens of the cosine
   similarity between the question's ORIGINAL text embeddings (LLM input embeddings) and the
   projected vision token, turned into a distribution by a softmax with temperature ``tau``;
3. inside the LLM only (location >= 0): the question tokens' mean cross-modal (t2v) attention.

Per sample, each signal's weight is its informativeness, the peakedness ``1 - H(p_i) / log V``
(a flat signal says nothing about which tokens matter; a peaked one does), normalised to sum to
1: ``s = sum_i w_i p_i``. Weights are therefore self-adaptive: when the question is about a
non-salient object the similarity map is the peaked one and dominates, and vice versa.

Positions: the method has no public code. At the interface it runs with ``positions=original`` (kept tokens keep
their own rotary positions), the default for every scorer; ``{name: mixture, positions: compact}`` gives the
consecutive positions of a LLaVA-codebase implementation that shortens the features before concatenation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


def peakedness(p: Tensor) -> Tensor:
    """[B] ``1 - H(p) / log V`` of distributions p [B, V] (0 = uniform, 1 = one-hot)."""
    entropy = -(p * p.clamp(min=1e-12).log()).sum(-1)
    return 1 - entropy / math.log(p.shape[-1])


def mixture_scores(distributions: list[Tensor]) -> Tensor:
    """Peakedness-weighted sum of [B, V] distributions."""
    stacked = torch.stack(distributions, 0)  # [N, B, V]
    weights = torch.stack([peakedness(p) for p in distributions], 0).clamp(min=1e-6)  # [N, B]
    weights = weights / weights.sum(0, keepdim=True)
    return (weights[..., None] * stacked).sum(0)


def text_image_similarity(text: Tensor, vision: Tensor, text_valid: Tensor) -> Tensor:
    """[B, V] mean over valid question tokens of cos(text [B, T, D], vision [B, V, D])."""
    cos = F.normalize(vision.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)  # [B, V, T]
    valid = text_valid[:, None, :].float()
    return (cos * valid).sum(-1) / valid.sum(-1).clamp(min=1)


@SCORERS.register("mixture")
@dataclass
class Mixture(Scorer):
    """Saliency + text-image similarity (+ t2v attention in the LLM), mixed by per-sample peakedness."""

    pre_llm = True
    needs_cls_saliency = True  # visual saliency: the CLS attention of the vision tower
    needs_llm_attention = False

    tau: float = 0.05  # temperature turning cosine similarities into a distribution

    def score(self, signals: Signals) -> Tensor:
        saliency = signals.cls_attention.float()
        saliency = saliency / saliency.sum(-1, keepdim=True).clamp(min=1e-12)
        similarity = text_image_similarity(signals.interface.text_embeds, signals.vision_embeds, signals.text_valid)
        parts = [saliency, torch.softmax(similarity / self.tau, dim=-1)]
        if signals.layer_idx >= 0:
            t2v = signals.t2v.sum(1)  # [B, V]
            parts.append(t2v / t2v.sum(-1, keepdim=True).clamp(min=1e-12))
        return mixture_scores(parts)
