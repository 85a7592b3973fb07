"""SparseVLM-style static text-prompt guidance (Zhang et al., ICML 2025).

Raters are chosen ONCE, before the LLM, from the original embeddings: the relevance of question
token t to the image is ``r_t = mean_v softmax_t(H_v H_q^T / sqrt(D))[v, t]``, and tokens with
``r_t`` at or above the mean over the question are raters. At every pruning layer the vision
tokens are scored by the raters' mean text-to-vision attention.

This is the simplified ablation of SparseVLM: its rater idea only, with the plan's counts, no rank-adaptive
counts and no recycling of the dropped tokens; ``sparsevlm`` (scorers/sparsevlm.py) is the method as its
authors' code runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


def select_raters(text_embeds: Tensor, vision_embeds: Tensor, text_valid: Tensor,
                  vision_valid: Tensor | None = None) -> Tensor:
    """[B, T] bool raters from text [B, T, D] and vision [B, V, D] embeddings at the LLM input
    (``vision_valid`` [B, V]: a row's real image tokens, when rows hold different numbers)."""
    logits = vision_embeds.float() @ text_embeds.float().transpose(1, 2) / math.sqrt(text_embeds.shape[-1])
    logits = logits.masked_fill(~text_valid[:, None, :], float("-inf"))  # [B, V, T]
    probs = torch.softmax(logits, dim=-1)
    if vision_valid is None or bool(vision_valid.all()):
        relevance = probs.mean(1)  # [B, T]
    else:
        relevance = (probs * vision_valid[:, :, None]).sum(1) / vision_valid.sum(1, keepdim=True).clamp(min=1)
    mean = (relevance * text_valid).sum(1, keepdim=True) / text_valid.sum(1, keepdim=True).clamp(min=1)
    return (relevance >= mean) & text_valid


@SCORERS.register("static_prompt")
@dataclass
class StaticPrompt(Scorer):
    """Vision-token score = mean t2v attention from the raters chosen before the LLM."""

    def score(self, signals: Signals) -> Tensor:
        raters = signals.memo.get("static_prompt.raters")
        if raters is None:  # first stage of this forward: choose once, reuse at every stage
            interface = signals.interface
            raters = select_raters(interface.text_embeds, interface.vision_embeds, signals.text_valid,
                                   interface.layout.vision_valid)
            signals.memo["static_prompt.raters"] = raters
        weights = raters.float() / raters.sum(1, keepdim=True).clamp(min=1)  # [B, T]
        return torch.einsum("bt,btv->bv", weights, signals.t2v)
