"""ATP: Adaptive Token Pruning at the vision-language interface (Li, Song and Hu; ``papers/atp-abstract.txt``).

Each image token gets a hybrid score of intra-modal saliency and inter-modal relevance,

    s_v = alpha * norm(a_cls)_v + (1 - alpha) * norm(sim)_v,
    sim_v = cos(W_v LN(h_v), W_t CLIP_text(question)),

where ``a_cls`` is the vision tower's CLS-to-patch attention (head mean, at the feature layer),
``h_v`` the tower's last hidden state of patch ``v``, ``W_v`` / ``W_t`` the CLIP projections and
``norm`` a per-sample min-max rescaling to [0, 1]; the top-K tokens enter the LLM.

The CLIP text tower comes from ``clip_path`` (a local CLIP checkpoint directory matching the vision
tower, e.g. ``openai/clip-vit-large-patch14-336`` for LLaVA-1.5), or from the ``clip/`` folder
shipped beside the model (the offline ``shapes`` model has one).

Positions: ATP has no public code; the abstract describes a gate at the interface that passes the top-K tokens
to the LLM. Experiments run it with ``positions=original`` (each kept token keeps its own rotary position, the
slot its patch had), the default for every scorer; ``{name: atp, positions: compact}`` gives the consecutive
positions that a LLaVA-codebase implementation, shortening the features before they are concatenated with the
text, would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


def min_max(x: Tensor) -> Tensor:
    """Per-row rescaling of [B, V] scores to [0, 1]."""
    low, high = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    return (x - low) / (high - low).clamp(min=1e-12)


def atp_scores(cls_attention: Tensor, similarity: Tensor, alpha: float) -> Tensor:
    """``alpha * norm(cls) + (1 - alpha) * norm(sim)`` for [B, V] inputs."""
    return alpha * min_max(cls_attention.float()) + (1 - alpha) * min_max(similarity.float())


class ClipText:
    """A CLIP text tower with its projections and tokenizer, plus the LLM tokenizer to read the question."""

    GENERATION_SUFFIX = "ASSISTANT:"  # LLaVA-1.5's prompt ends "... {question} ASSISTANT:"

    def __init__(self, clip_path: Path, llm_path: Path | None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(clip_path, local_files_only=True).eval()  # a CLIP model
        self.tokenizer = AutoTokenizer.from_pretrained(clip_path, local_files_only=True)
        self.llm_tokenizer = AutoTokenizer.from_pretrained(llm_path or clip_path, local_files_only=True)

    def questions(self, input_ids: Tensor, text_slots: Tensor, valid: Tensor) -> list[str]:
        texts = []
        for ids, slots, ok in zip(input_ids, text_slots, valid):
            text = self.llm_tokenizer.decode(ids[slots[ok]].tolist(), skip_special_tokens=True).strip()
            texts.append(text.removesuffix(self.GENERATION_SUFFIX).strip())
        return texts

    @torch.no_grad()
    def embed_texts(self, texts: list[str], device: torch.device) -> Tensor:
        """[B, E] unit-norm CLIP text embeddings (an EOS is appended if the tokenizer does not add one).

        Padded on the right whatever the tokenizer's side: CLIP numbers positions from the first slot and
        pools the (first) EOS under a causal mask, so each row's text then embeds as it does alone.
        """
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt", padding_side="right")
        eos = self.model.config.text_config.eos_token_id
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if not (ids == eos).any(dim=1).all():
            lengths = mask.sum(1)  # right padding: the first slot after each row's text
            ids = torch.cat([ids, torch.full_like(ids[:, :1], self.tokenizer.pad_token_id)], 1)
            mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
            ids[torch.arange(len(ids)), lengths] = eos
            mask[torch.arange(len(ids)), lengths] = 1
        self.model.to(device)
        features = self.model.get_text_features(input_ids=ids.to(device), attention_mask=mask.to(device))
        return F.normalize(features.pooler_output, dim=-1)

    @torch.no_grad()
    def embed_patches(self, states: Tensor) -> Tensor:
        """[B, V, E] unit-norm CLIP patch embeddings from vision-tower last hidden states [B, V, Dv] (cast to the
        CLIP model's dtype: a bf16 / fp16 VLM hands its states in its own)."""
        vision = self.model.vision_model
        states = states.to(self.model.visual_projection.weight.dtype)
        return F.normalize(self.model.visual_projection(vision.post_layernorm(states)), dim=-1)


@SCORERS.register("atp")
@dataclass
class ATP(Scorer):
    """Hybrid of the vision tower's CLS attention and CLIP patch-question similarity, before the LLM."""

    pre_llm = True
    needs_cls_saliency = True  # visual saliency: the CLS attention of the vision tower
    needs_llm_attention = False

    alpha: float = 0.5  # weight of CLS attention (1 - alpha: CLIP similarity)
    clip_path: str | None = None  # local CLIP checkpoint directory; default: <model dir>/clip
    _clip: Any = field(default=None, init=False, repr=False)

    def bind(self, adapter: Any) -> None:
        """Load the CLIP text tower; a clear error says what to configure when there is none."""
        if self._clip is not None:
            return
        model_dir = adapter.path
        candidate = Path(self.clip_path) if self.clip_path else (model_dir / "clip" if model_dir else None)
        if candidate is None or not (candidate / "config.json").is_file():
            raise ValueError(
                f"atp needs a CLIP text model matching the vision tower: set the scorer's clip_path to a local "
                "CLIP checkpoint directory (tried "
                f"{str(candidate) if candidate else 'none: the model has no local path'})"
            )
        self._clip = ClipText(candidate, model_dir)

    def score(self, signals: Signals) -> Tensor:
        if self._clip is None:
            raise RuntimeError("atp: bind(adapter) was not called (the pruning engine does this)")
        interface = signals.interface
        texts = self._clip.questions(interface.input_ids, interface.layout.text, interface.layout.text_valid)
        text = self._clip.embed_texts(texts, signals.layout.vision.device)  # [B, E]
        patches = self._clip.embed_patches(signals.patch_states)  # [B, V, E]
        similarity = torch.einsum("bve,be->bv", patches.float(), text.float())
        return atp_scores(signals.cls_attention, similarity, self.alpha)
