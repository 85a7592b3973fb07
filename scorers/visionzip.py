"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025).

Reference followed: the authors' repository dvlab-research/VisionZip on LLaVA-1.5 (``visionzip/clip_encoder.py``:
``CLIPVisionTower_VisionZip.forward``; ``visionzip/utils.py``: the patched CLIP attention that keeps the keys;
``visionzip/main.py``: ``visionzip(model, dominant, contextual)``). Before the LLM (location -1), per image:

1. Dominant tokens: the CLS token's attention over the patches at LLaVA's feature layer (``attentions[-2]``, the
   layer whose output ``hidden_states[-2]`` feeds the projector), summed over heads; the top ``d`` patches stay.
2. Contextual tokens: the other patches, in raster order (``N`` of them), by their keys of that layer averaged over
   heads (``k_proj`` output, bias included) and L2-normalized; ``c`` targets are taken uniformly
   (``arange(0, N, max(1, N // c))[:c]``), every other patch joins the target of highest cosine (``argmax``: the
   first on ties), and each target with its joiners becomes one token.

The budget: the plan's interface keep count ``k`` is ``dominant + contextual``. Their split (``contextual=None``):
``k = 64``: 54 + 10 (their README), 128: 108 + 20, 192: 162 + 30 (the paper's settings; the repository names only
54 + 10, and ``main.py``'s defaults 191 + 30); any other ``k``: ``c = round(5 k / 32)`` (the same 10 / 64 share),
``d = k - c``. ``contextual`` (an int) fixes ``c``.

The CLS token (``cls_counting``): their ``visionzip(dominant=54)`` keeps the CLS token plus 53 patches
(``dominant_num = dominant - 1``) and feeds the CLS token's feature to the LLM as one of its 64 image tokens;
LightCompress (``llmc/compression/token_reduction/visionzip.py``) keeps the CLS token plus ``dominant`` patches,
and LLaVA's ``feature_select`` then drops the CLS token, so 64 patch tokens reach the LLM.

* ``"lightcompress"`` (default): ``d`` patches + ``c`` contextual = ``k`` image tokens, the same count as every
  other scorer at that budget;
* ``"authors"``: ``d - 1`` patches + ``c`` contextual = ``k - 1`` image tokens. The CLS token their code adds is
  not inserted (the LLM's input holds the patches only: LLaVA's ``vision_feature_select_strategy="default"``),
  so this reading runs one token under the budget.

Differences from their code:

* the merged token: theirs is ``h_target + mean(h_joiners)`` (the target NOT in the mean, added on top; a target
  that nobody joins stays itself) on the tower's ``hidden_states[-2]``, then projected; here it is the engine's
  interface merge, the plain mean of the projected image embeddings of the target and its joiners (the
  projector is a non-linear MLP, so the two differ unless the group is the target alone);
* where the tokens sit: theirs are ``[CLS, dominant patches in raster order, contextual tokens in target order]``
  with consecutive positions; here dominant patches keep their slots and each contextual token sits in the slot
  of its group's last member (``research.pruning.engine``); ``positions=compact`` gives consecutive positions;
* the CLS attention is the head mean in float32 (``signals.cls_attention``), theirs the head sum in the model's
  dtype: the same order up to rounding; the keys and cosines are computed in float32 (theirs: the model's dtype);
* the layer: theirs reads ``attentions[-2]`` / ``hidden_states[-2]`` and the keys of encoder layer 22 (``apply_info``:
  ``r = [0] * 22 + [1] + [0]``, i.e. ``layers[-2]`` of CLIP-L's 24); here the adapter's feature layer
  (``vision_feature_layer``, -2 on LLaVA-1.5: the same layer), whatever the tower's depth;
* their code runs a batch of unpadded images of equal length; here each row (one image) is scored alone;
* ``vision_feature_select_strategy="full"`` (the CLS token is an image token) is not special-cased: both codes
  always keep the CLS token, here it is ranked by its own CLS-to-CLS attention like a patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer

PAPER_SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}  # budget -> (dominant, contextual), with CLS counted
CONTEXTUAL_SHARE = 5 / 32  # 10 of 64, 20 of 128, 30 of 192
CLS_COUNTINGS = ("lightcompress", "authors")


def contextual_count(keep: int) -> int:
    """Their contextual tokens of a ``keep``-token budget."""
    return PAPER_SPLITS[keep][1] if keep in PAPER_SPLITS else round(keep * CONTEXTUAL_SHARE)


def uniform_targets(num_tokens: int, num_targets: int) -> Tensor:
    """Indices of the targets among ``num_tokens`` remaining tokens: ``arange(0, N, max(1, N // c))[:c]``."""
    step = max(1, num_tokens // num_targets)
    return torch.arange(0, num_tokens, step)[:num_targets]


def contextual_groups(keys: Tensor, num_targets: int) -> Tensor:
    """[N] the group (0 .. targets - 1) of each of ``N`` remaining tokens with keys [N, C]: targets taken
    uniformly, each other token joins its most similar target by cosine (first on ties)."""
    num_tokens = keys.shape[0]
    targets = uniform_targets(num_tokens, num_targets).to(keys.device)
    normalized = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    others = ~torch.isin(torch.arange(num_tokens, device=keys.device), targets)
    similarity = normalized[others] @ normalized[targets].T  # [N - c, c]
    groups = torch.empty(num_tokens, dtype=torch.long, device=keys.device)
    groups[targets] = torch.arange(len(targets), device=keys.device)
    groups[others] = similarity.argmax(dim=1)
    return groups


def head_mean_keys(vision_k: Tensor, num_heads: int) -> Tensor:
    """[B, T, hd] the tower layer's keys averaged over heads, from its ``k_proj`` output [B, T, H*hd]."""
    batch, tokens, width = vision_k.shape
    return vision_k.view(batch, tokens, num_heads, width // num_heads).mean(2)


@SCORERS.register("visionzip")
@dataclass
class VisionZip(Scorer):
    """Dominant patches by the vision tower's CLS attention; the rest merged into contextual tokens by key cosine."""

    pre_llm: ClassVar[bool] = True
    needs_llm_attention: ClassVar[bool] = False
    needs_cls_saliency: ClassVar[bool] = True  # dominant tokens: the CLS attention of the vision tower

    contextual: int | None = None  # contextual tokens; None = their split of the plan's count
    cls_counting: str = "lightcompress"  # lightcompress (k patch tokens) | authors (CLS counted: k - 1 patches)

    def __post_init__(self) -> None:
        if self.cls_counting not in CLS_COUNTINGS:
            raise ValueError(f"visionzip cls_counting {self.cls_counting!r} unknown; choose one of "
                             f"{list(CLS_COUNTINGS)}")
        if self.contextual is not None and self.contextual < 0:
            raise ValueError(f"visionzip contextual {self.contextual!r} is negative; choose an int >= 0 or None "
                             "(their split of the plan's count)")

    def split(self, keep: int) -> tuple[int, int]:
        """(dominant patches, contextual tokens) of a ``keep``-token budget."""
        contextual = min(contextual_count(keep) if self.contextual is None else self.contextual, keep)
        dominant = keep - contextual - (1 if self.cls_counting == "authors" else 0)
        return max(dominant, 0), contextual

    def score(self, signals: Signals) -> Tensor:
        return signals.cls_attention.float()

    def keep_counts(self, signals: Signals, planned: list[int]) -> list[int]:
        """Each row's dominant patches (the contextual tokens are added by ``merge_groups``)."""
        remaining = signals.vision_valid.sum(1).tolist()
        counts, contextual = [], []
        for keep, have in zip(planned, remaining):
            if keep >= have:  # the budget holds every token: nothing to select or merge
                counts.append(have)
                contextual.append(0)
                continue
            dominant, merged = self.split(keep)
            counts.append(dominant)
            contextual.append(merged)
        signals.memo["visionzip.contextual"] = contextual
        return counts

    def merge_groups(self, signals: Signals, vision_hidden: Tensor, is_kept: Tensor) -> Tensor | None:
        """[B, V] the contextual group of each non-dominant patch (-1: dominant, or padding)."""
        contextual = signals.memo.get("visionzip.contextual")
        if contextual is None:
            raise RuntimeError("visionzip: merge_groups ran before keep_counts (the pruning engine calls both)")
        interface = signals.interface
        keys = head_mean_keys(interface.vision_k, interface.vision_heads)[:, -is_kept.shape[1]:]  # [B, V, hd]
        groups = torch.full_like(is_kept, -1, dtype=torch.long)
        rest = signals.vision_valid & ~is_kept
        for b, targets in enumerate(contextual):
            members = rest[b].nonzero().squeeze(1)  # ascending: their raster order
            if targets == 0 or len(members) == 0:
                continue
            groups[b, members] = contextual_groups(keys[b, members], targets)
        return groups
