"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's token layout and 3-D rotary positions
with a window-attention ViT; everything the engine needs is as in ``qwen2_vl``."""

from __future__ import annotations

from typing import Any

from research.models.base import register
from research.models.qwen2_vl import Qwen2VLAdapter


@register
class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    lmms_eval_model = "qwen2_5_vl"
    cuts_at_until = True
    drops_until = ("\n\n",)  # "to prevent truncation, which can lead to incorrect results" (the wrapper)

    @classmethod
    def random_config(cls, size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
        from transformers import Qwen2_5_VLConfig

        base = super().random_config(size, num_layers, num_kv_heads)
        tiny = size == "tiny"
        vision = dict(depth=2, hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                      out_hidden_size=base.text_config.hidden_size, num_heads=4, patch_size=2 if tiny else 14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=8 if tiny else 112,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=base.text_config.to_dict(), vision_config=vision, image_token_id=3,
                                video_token_id=4, vision_start_token_id=5, vision_end_token_id=6)
