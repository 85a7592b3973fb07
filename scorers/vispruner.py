"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", ICCV 2025).

Reference followed: the authors' repository Theia-4869/VisPruner on LLaVA-1.5 (``llava/model/llava_arch.py``:
``LlavaMetaForCausalLM.encode_images``; ``llava/model/multimodal_encoder/clip_encoder.py``: ``feature_select``).
Before the LLM (location -1), per image of ``N`` patches and a budget of ``T`` tokens (the plan's interface keep
count, their ``visual_token_num``):

1. Important tokens: the CLS token's attention over the patches at LLaVA's feature layer (``attentions[-2]``),
   averaged over heads; the patches sorted by it, descending (``argsort``), the first
   ``T_imp = int(T * important_ratio)`` stay; the others, in that order, are the residual.
2. Diverse tokens (``T_div = T - T_imp``): duplicates are removed from the residual until ``T_div`` remain. Each
   round, with ``R`` residual tokens and ``r = min(8, R - T_div)``, the residual (unit-norm features) is split by
   alternation into ``a`` (even places) and ``b`` (odd places); each ``a`` token's score is its highest cosine to a
   ``b`` token; the ``r`` ``a`` tokens of highest score are removed (the residual becomes the rest of ``a``, in
   score order, then ``b``).

``important_ratio`` is their ``--important_ratio`` (default 0.5, their argparse default; their README also runs 0.75
at 64 tokens: 48 important + 16 diverse).

Differences from their code:

* the features compared in step 2: theirs are the tower's hidden states at the feature layer
  (``hidden_states[-2]``, before the projector); the engine captures no such tensor at the interface (only the
  tower's q/k of that layer and its last hidden state), so ``features`` picks a stand-in: ``"projected"``
  (default) the image embeddings the LLM receives, the projector's output of exactly those hidden states (equal
  features stay equal, but cosines differ); ``"tower_last"`` the tower's last hidden state (one layer later, in
  the tower's space). The exact reading needs the engine to capture the feature layer's output (the report says
  how);
* their loop indexes ``R // 2 - r`` places of ``a`` and fails when ``R`` is odd (``a`` has ``R // 2 + 1``); here an
  odd ``R`` keeps the ``len(a) - r`` remaining ``a`` tokens, the same rule; on LLaVA-1.5 (576 patches) with the
  budgets their scripts run, ``R`` is even and the two agree;
* the CLS attention is computed in float32 from the tower's queries and keys (``signals.cls_attention``), theirs
  in the model's dtype from eager weights; the cosines in float32;
* their code runs a batch of unpadded images of equal length; here each row (one image) is selected alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer

MAX_REMOVED_PER_ROUND = 8  # their r = min(8, R - T_div)
FEATURES = ("projected", "tower_last")


def remove_duplicates(residual: Tensor, normalized: Tensor, keep: int) -> Tensor:
    """The ``keep`` tokens of ``residual`` (indices, in their order) left after their iterative matching and pruning
    on unit-norm features ``normalized`` [N, C]."""
    while keep > 0:
        count = residual.shape[0]
        removed = min(MAX_REMOVED_PER_ROUND, count - keep)
        if removed <= 0:
            break
        tokens = normalized[residual]
        a, b = tokens[::2], tokens[1::2]
        scores = (a @ b.T).max(dim=-1).values  # [ceil(R / 2)]
        distinct = scores.argsort(dim=-1, descending=True)[removed:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    return residual


def vispruner_selection(attention: Tensor, features: Tensor, budget: int, important_ratio: float) -> Tensor:
    """[T] indices of the tokens VisPruner keeps of one image: ``attention`` [N] CLS attention, ``features`` [N, C]."""
    important_count = int(budget * important_ratio)
    diverse_count = budget - important_count
    order = attention.argsort(dim=-1, descending=True)
    important, residual = order[:important_count], order[important_count:]
    if diverse_count <= 0:
        return important
    normalized = features.float() / features.float().norm(dim=-1, keepdim=True)
    return torch.cat([important, remove_duplicates(residual, normalized, diverse_count)])


@SCORERS.register("vispruner")
@dataclass
class VisPruner(Scorer):
    """Important patches by the vision tower's CLS attention, then diverse ones by iterative duplicate removal."""

    pre_llm: ClassVar[bool] = True
    needs_llm_attention: ClassVar[bool] = False
    needs_cls_saliency: ClassVar[bool] = True  # important tokens: the CLS attention of the vision tower

    important_ratio: float = 0.5  # their --important_ratio: T_imp = int(T * ratio)
    features: str = "projected"  # projected (the LLM's image embeddings) | tower_last (the tower's last state)

    def __post_init__(self) -> None:
        if not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner important_ratio {self.important_ratio!r} is outside [0, 1]")
        if self.features not in FEATURES:
            raise ValueError(f"vispruner features {self.features!r} unknown; choose one of {list(FEATURES)}")

    def keep_counts(self, signals: Signals, planned: list[int]) -> list[int]:
        """The plan's counts, kept for ``score`` (the selection depends on the budget, not only the ranking)."""
        signals.memo["vispruner.budget"] = list(planned)
        return list(planned)

    def _features(self, signals: Signals) -> Tensor:
        return signals.vision_embeds if self.features == "projected" else signals.patch_states

    def score(self, signals: Signals) -> Tensor:
        """The selected tokens score above 1 (2 + their CLS attention), the others their CLS attention (<= 1)."""
        budget = signals.memo.get("vispruner.budget")
        if budget is None:
            raise RuntimeError("vispruner: score needs the stage's keep counts; the pruning engine calls "
                               "keep_counts first")
        attention = signals.cls_attention.float()
        features = self._features(signals)
        counts = signals.vision_valid.sum(1).tolist()
        selected = torch.zeros_like(attention, dtype=torch.bool)
        for b, (n, keep) in enumerate(zip(counts, budget)):
            if keep >= n:
                selected[b, :n] = True
                continue
            selected[b, vispruner_selection(attention[b, :n], features[b, :n], keep, self.important_ratio)] = True
        return attention + 2.0 * selected
