"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", 2025): a conditional determinantal point process over the image tokens, before the LLM.

Reference followed: the authors' repository Theia-4869/CDPruner, ``llava/model/llava_arch.py`` (``encode_images``),
``llava/model/multimodal_encoder/clip_encoder.py`` (``forward``, ``load_text_tower``) and
``llava/eval/model_vqa_loader.py`` (the text it is given). Per image:

1. similarity: ``S = cos`` of the projected image features (the projector's output, normalised in the model's
   dtype, then float32);
2. relevance: ``e_v = visual_projection(post_layernorm(h_v))`` with ``h_v`` the CLIP patch states of LLaVA's
   feature layer (the projector's input; ``post_layernorm`` of LLaVA's tower, ``visual_projection`` of the CLIP
   checkpoint), ``e_t`` the CLIP text tower's projected embedding of the question (``text_embeds``), both unit
   norm; ``r = mean_t(-e_v . e_t)``, rescaled ``(r - min r + 1e-6) / (max r - min r)``;
3. kernel ``L = diag(r) S diag(r)``; greedy MAP inference (Chen et al.'s fast Cholesky update): ``T`` steps of
   ``j = argmax d2`` (first index on ties), ``e = (L[j] - c[:, j] . c) / sqrt(d2[j])``, ``d2 -= e^2``,
   ``d2[j] = -inf``; the chosen indices are sorted (``torch.sort(select_idx)``): the kept tokens enter the LLM in
   their original order, as the engine keeps any set. ``score`` ranks the ``i``-th chosen ``n - i``.

The relevance sign (``relevance``): their code negates the cosine (``(-relevance).mean(-1)``); the paper defines
relevance as the similarity itself. The maintainers answer (Theia-4869/CDPruner issues #9, #14, #19) that the sign
is deliberate for LLaVA's CLIP (its feature layer is not the one CLIP's projection was trained on):
``relevance="negative"`` (default, the code) or ``"positive"`` (the paper). ``theta``: their commented-out
variant ``r = exp(alpha r)``, ``alpha = theta / (2 (1 - theta))`` (None: off, as their code runs).

The text: ``model_vqa_loader.py`` passes the question (``line["text"]`` without LLaVA's
``"\\nAnswer the question using a single word or phrase."``); here the question is read back from the prompt's
text after the image (``ClipText.questions``: decoded, ``ASSISTANT:`` dropped) and ``drop_text`` removed. A
question longer than the CLIP text context is cut, as theirs, into context-long segments, each embedded
(``M`` embeddings), and the relevance averaged over them.

The CLIP text tower and projection come from ``clip_path`` (as ``atp``: a local CLIP checkpoint matching the vision
tower, e.g. ``openai/clip-vit-large-patch14-336``, or ``<model dir>/clip``).

Families: the CLIP patch states must be the image tokens one to one (LLaVA-1.5's CLIP ViT: ``needs_clip_patches``);
other families are refused in one line before loading.

Positions: their code prunes the image features before they are concatenated with the text, so the LLM numbers
the shortened sequence consecutively: their reading is ``positions: compact``.

Differences from their code:

* the feature-layer states are read by a forward pre-hook on the projector, installed by ``bind`` (the engine
  captures only the tower's last hidden state);
* each row of a left-padded batch is one sample (their relevance min / max run over the whole [B, N] tensor of a
  batch of one prompt's images); padding entries are left out;
* a chosen token is never chosen again (theirs: only ``d2[j] = -inf``, which a NaN from ``sqrt`` of a negative
  ``d2`` past the kernel's numerical rank could undo); the greedy stops at the plan's count (``keep_counts``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.atp import ClipText
from scorers.base import SCORERS, Scorer
from scorers.divprune import order_scores

RELEVANCE_SIGNS = {"negative": -1.0, "positive": 1.0}
SHORT_ANSWER = "Answer the question using a single word or phrase."


def cosine_similarity(features: Tensor) -> Tensor:
    """[N, N] float32 cosine of [N, D] features, normalised in their own dtype (as CDPruner)."""
    unit = (features / features.norm(dim=-1, keepdim=True)).float()
    return unit @ unit.t()


def relevance_scores(image_embeds: Tensor, text_embeds: Tensor, sign: float, theta: float | None) -> Tensor:
    """[N] CDPruner's min-max rescaled relevance of [N, C] image embeddings to [M, C] text embeddings."""
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (sign * (image_embeds @ text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


def dpp_greedy(kernel: Tensor, steps: int) -> Tensor:
    """[steps] the tokens fast greedy MAP inference of the DPP with [N, N] ``kernel`` chooses, in order."""
    num = kernel.shape[0]
    steps = min(steps, num)
    cis = kernel.new_zeros(steps, num)
    di2s = torch.diagonal(kernel).clone()
    available = torch.ones(num, dtype=torch.bool, device=kernel.device)
    chosen = torch.empty(steps, dtype=torch.long, device=kernel.device)
    for i in range(steps):
        j = di2s.masked_fill(~available, float("-inf")).argmax()
        chosen[i], available[j] = j, False
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[j] = float("-inf")
    return chosen


@SCORERS.register("cdpruner")
@dataclass
class CDPruner(Scorer):
    """Conditional DPP (instruction relevance x feature similarity), greedy MAP, before the LLM."""

    pre_llm = True
    needs_llm_attention = False
    needs_clip_patches = True  # the CLIP patch states are the image tokens one to one

    relevance: str = "negative"  # negative (their code) | positive (the paper)
    theta: float | None = None  # their commented-out exp(theta / (2 (1 - theta)) * r); None: off
    clip_path: str | None = None  # local CLIP checkpoint directory; default: <model dir>/clip
    drop_text: str = SHORT_ANSWER  # removed from the question before the CLIP text tower ("" keeps it all)
    _clip: Any = field(default=None, init=False, repr=False)
    _adapter: Any = field(default=None, init=False, repr=False)
    _features: dict = field(default_factory=dict, init=False, repr=False)
    _planned: list[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.relevance not in RELEVANCE_SIGNS:
            raise ValueError(f"cdpruner: relevance {self.relevance!r} unknown; choose one of {list(RELEVANCE_SIGNS)}")
        if self.theta is not None and not 0 <= self.theta < 1:
            raise ValueError(f"cdpruner: theta {self.theta!r} must be in [0, 1) or None")

    def bind(self, adapter: Any) -> None:
        """Load the CLIP text tower; hook the projector's input (the feature layer's patch states)."""
        if self._adapter is not adapter:
            self._adapter = adapter
            self._hook_projector(adapter.projector)
        if self._clip is not None:
            return
        model_dir = adapter.path
        candidate = Path(self.clip_path) if self.clip_path else (model_dir / "clip" if model_dir else None)
        if candidate is None or not (candidate / "config.json").is_file():
            tried = str(candidate) if candidate else "none: the model has no local path"
            raise ValueError("cdpruner needs a CLIP text model matching the vision tower: set the scorer's clip_path "
                             f"to a local CLIP checkpoint directory (tried {tried})")
        self._clip = ClipText(candidate, model_dir)

    def _hook_projector(self, projector: Any) -> None:
        """Keep the projector's input of each forward; the hook removes itself once this scorer is gone."""
        scorer, handle = weakref.ref(self), None

        def keep_states(module: Any, args: tuple) -> None:
            owner = scorer()
            if owner is None or owner._adapter is None or owner._adapter.projector is not module:
                handle.remove()
                return
            owner._features["states"] = args[0]

        handle = projector.register_forward_pre_hook(keep_states)

    def keep_counts(self, signals: Signals, planned: list[int]) -> list[int]:
        """The plan's counts, unchanged; remembered so the greedy stops there."""
        self._planned = list(planned)
        return planned

    def _questions(self, signals: Signals) -> list[str]:
        interface = signals.interface
        texts = self._clip.questions(interface.input_ids, interface.layout.text, interface.layout.text_valid)
        return [" ".join(t.replace(self.drop_text, "").split()) if self.drop_text else t for t in texts]

    @torch.no_grad()
    def _text_embeds(self, text: str, device: torch.device) -> Tensor:
        """[M, C] projected CLIP text embeddings of ``text``, cut as theirs into segments of the text context
        (``max_position_embeddings``), zero-padded (ids and mask). An EOS is appended if the tokenizer adds none
        (CLIP's does; the offline word tokenizer does not), as ``ClipText.embed_texts``."""
        clip = self._clip
        ids = clip.tokenizer(text, return_tensors="pt").input_ids
        eos = clip.model.config.text_config.eos_token_id
        if not (ids == eos).any():
            ids = torch.cat([ids, ids.new_full((1, 1), eos)], 1)
        context = clip.model.config.text_config.max_position_embeddings
        segments = (ids.shape[1] - 1) // context + 1
        padding = context * segments - ids.shape[1]
        ids, mask = (torch.cat([v, v.new_zeros(1, padding)], 1).reshape(-1, context).to(device)
                     for v in (ids, torch.ones_like(ids)))
        clip.model.to(device)
        return clip.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.float()

    @torch.no_grad()
    def _image_embeds(self, states: Tensor) -> Tensor:
        """[B, V, C] CLIP-space embeddings of the feature layer's patch states [B, V, Dv]."""
        normed = self._adapter.vision_tower.post_layernorm(states)
        projection = self._clip.model.visual_projection
        return projection(normed.to(projection.weight.dtype)).float()

    def score(self, signals: Signals) -> Tensor:
        if self._clip is None or "states" not in self._features:
            raise RuntimeError("cdpruner: bind(adapter) was not called or no image was encoded in this forward")
        planned, self._planned = self._planned, None
        states = self._features.pop("states")[:, -signals.num_vision:]  # [B, V, Dv]: patches (no CLS)
        texts = [self._text_embeds(t, signals.layout.vision.device) for t in self._questions(signals)]  # [M_b, C]
        image_embeds = self._image_embeds(states)
        sign, valid = RELEVANCE_SIGNS[self.relevance], signals.vision_valid
        steps = max(planned) if planned else signals.num_vision
        order = torch.full((valid.shape[0], min(steps, signals.num_vision)), -1, dtype=torch.long,
                           device=valid.device)
        for b in range(valid.shape[0]):
            index = valid[b].nonzero()[:, 0]
            relevance = relevance_scores(image_embeds[b, index], texts[b], sign, self.theta)
            kernel = relevance[:, None] * cosine_similarity(signals.vision_embeds[b, index]) * relevance[None, :]
            chosen = dpp_greedy(kernel, steps)
            order[b, : len(chosen)] = index[chosen]
        return order_scores(order, signals.num_vision)
