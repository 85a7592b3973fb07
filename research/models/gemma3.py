"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower without CLS token whose patches the projector pools
to ``mm_tokens_per_image`` (256) image tokens per image, between ``<start_of_image>`` and ``<end_of_image>``; the
language model mixes sliding-window layers with global ones (``text_config.layer_types``), each type with its own
mask and rotary base (local 10k, global 1M), and per-head query / key norms. In the prefill its image tokens attend
to each other both ways (``token_type_ids``): transformers builds one 4-D mask per layer type and the engine slices
each, and each type's rotary embedding, alike (``research.pruning.engine``). While the whole sequence fits the
sliding window the two types' masks are equal, so a longer sequence is refused (as for any windowed model);
``positions=compact`` (one renumbering per rotary base) is refused in one line."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from research.models.base import UnsupportedModel, VisionLayout, VLMAdapter, register


@register
class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    model_class = "Gemma3ForConditionalGeneration"
    mixed_layer_types = True
    no_vision_merging = "its projector pools the SigLIP patches to a fixed number of image tokens"
    lmms_eval_model = "gemma3"
    cuts_at_until = True
    drops_until = ("\n\n",)  # generate_until removes "\n\n" from ``until`` first

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        text = config.text_config
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModel(f"{cls.model_class} with use_bidirectional_attention=True is not supported: every "
                                   "text token would attend both ways; supported: causal text (the released models)")
        if getattr(text, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModel(f"{cls.model_class} with attn_logit_softcapping={text.attn_logit_softcapping} is "
                                   "not supported: the scorers' attention has no softcap; supported: None (Gemma 3)")

    @classmethod
    def compact_positions_refusal(cls) -> str | None:
        return (f"positions=compact is not supported on {cls.family}: its sliding and global layers rotate with "
                "different bases, renumbered per layer type by no code here; use positions=original")

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        count = config.mm_tokens_per_image
        return VisionLayout(config.text_config.num_hidden_layers, count,
                            "mm_tokens_per_image: the projector pools the SigLIP patches to a fixed grid", count)

    def rotary_for(self, layer_idx: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return partial(self.rotary_emb, layer_type=self.layer_types()[layer_idx])

    def flat_projection(self, output: torch.Tensor) -> torch.Tensor:
        """Gemma 3 normalises queries and keys after moving heads first: ``[B, H, S, hd]`` -> ``[B, S, H*hd]``."""
        return output.transpose(1, 2).flatten(-2) if output.dim() == 4 else output

    def fallback_prompt(self, question: str) -> str:
        return (f"<bos><start_of_turn>user\n<start_of_image>{question}<end_of_turn>\n"
                "<start_of_turn>model\n")
