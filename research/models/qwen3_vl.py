"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2-VL's token layout (``<|vision_start|>``, the image's
merged-patch tokens, ``<|vision_end|>``; every image token is prunable, the two markers stay) and multimodal rotary
positions (3-D with interleaved sections, ``[4, B, S]`` with a text row), per-head query / key norms (Qwen3), and
**DeepStack**: features of intermediate vision layers (``deepstack_visual_indexes``), one set per language layer
``0 .. len - 1``, added to that layer's output at the visual positions. The engine takes them out of the language
model's call and adds them itself after those layers, on the kept slots: a token dropped before or at such a layer
loses its features with it, a merged token gets its members' mean (``research.pruning.engine``). No CLS token."""

from __future__ import annotations

from typing import Any

from research.models.base import register
from research.models.qwen2_vl import Qwen2VLAdapter


@register
class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"
    lmms_eval_model = "qwen3_vl"
    cuts_at_until = True
    drops_until = ("\n\n",)  # as its Qwen2.5-VL wrapper
    # the language model's keywords for the visual positions [B, S] and the per-layer DeepStack features
    deepstack_keywords = ("visual_pos_masks", "deepstack_visual_embeds")

    @classmethod
    def deepstack_layers(cls, config: Any) -> int:
        return len(config.vision_config.deepstack_visual_indexes)
