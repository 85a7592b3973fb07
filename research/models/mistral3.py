"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.1 / 3.2, Ministral 3): a Pixtral vision tower
(2-D rotary, no CLS token: no CLS saliency), a patch merger that folds each ``spatial_merge_size``^2 block of
patches into one token, an MLP projector and a Mistral LLM (LLaMA-like, 1-D positions). The image's size sets the
token count: ``(h / (patch * merge)) * (w / (patch * merge))``.

The processor lays each image out as rows: ``[IMG]`` once per merged patch of a row, then ``[IMG_BREAK]``, the
last row's ``[IMG_BREAK]`` replaced by ``[IMG_END]``. **Only ``[IMG]`` tokens (the config's ``image_token_id``)
are prunable image tokens**, ranked and counted by the budget; ``[IMG_BREAK]`` and ``[IMG_END]`` carry other ids,
so they are never in the kept set and always stay (``[IMG_END]``, after the last image token, is the first token
of the engine's "text" span, as Qwen2-VL's ``<|vision_end|>``).

A Mistral LLM with a sliding window (v0.1-style configs) is refused like any family's (``VLMAdapter.check_config``);
Mistral Small 3.x and Ministral 3 configs have none. Ministral 3's LLM (``ministral3``) scales its queries by
``1 + beta * log(1 + floor(position / original_max_position_embeddings))``: exactly 1 below that position (16384 in
the released configs), so the engine's attention signals are the model's there; a config whose scaling starts
within the nominal image is refused (the engine does not apply the scale).
"""

from __future__ import annotations

from typing import Any

from research.models.base import UnsupportedModel, VisionLayout, VLMAdapter, register


@register
class Mistral3Adapter(VLMAdapter):
    family = "mistral3"
    model_class = "Mistral3ForConditionalGeneration"
    no_vision_merging = "its patch merger folds each 2x2 block of an image-sized patch grid into one token"
    lmms_eval_model = "mistral3_vl"
    cuts_at_until = False  # generate_until never reads ``until``

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Also refuse an LLM that scales its queries (Ministral 3) from a position within the nominal image."""
        super().check_config(config)
        start, nominal = cls.query_scaling_start(config), cls.vision_layout(config).nominal_tokens
        if start is not None and start <= nominal:
            raise UnsupportedModel(
                f"{cls.model_class}'s language model scales its queries from position {start} on "
                f"(llama_4_scaling_beta), within {nominal} image tokens: the engine's attention signals leave that "
                "scale out; supported: original_max_position_embeddings above every prompt with its answer")

    @classmethod
    def query_scaling_start(cls, config: Any) -> int | None:
        """The position from which the LLM multiplies its queries by ``1 + beta * log(1 + floor(p / start))``
        (Ministral 3's ``llama_4_scaling_beta``, with ``start`` its ``original_max_position_embeddings``); None
        when it never does (Mistral)."""
        rope = getattr(config.text_config, "rope_parameters", None) or {}
        return rope.get("original_max_position_embeddings") if rope.get("llama_4_scaling_beta") else None

    @classmethod
    def merged_patch(cls, config: Any) -> int:
        """Pixels per image token along each side: the tower's patch times the merger's ``spatial_merge_size``."""
        patch = config.vision_config.patch_size
        return (patch[0] if isinstance(patch, (list, tuple)) else patch) * config.spatial_merge_size

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        side = cls.merged_patch(config)
        nominal = (448 // side) ** 2  # a 448x448 image: 256 tokens at patch 14, merge 2 (as Qwen2-VL's)
        return VisionLayout(config.text_config.num_hidden_layers, None,
                            f"one [IMG] token per {config.spatial_merge_size}x{config.spatial_merge_size} merged "
                            f"patches ({side} pixels), [IMG_BREAK] after each row: set by the image size", nominal)

    def fallback_prompt(self, question: str) -> str:
        """The prompt lmms-eval's ``mistral3_vl`` wrapper writes for one image (Mistral's ``[INST]`` format)."""
        return f"<s>[INST][IMG]\n{question}[/INST]"
