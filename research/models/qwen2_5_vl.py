"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's token layout and 3-D rotary positions
with a window-attention ViT; everything the engine needs is as in ``qwen2_vl``."""

from __future__ import annotations

from research.models.base import register
from research.models.qwen2_vl import Qwen2VLAdapter


@register
class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    lmms_eval_model = "qwen2_5_vl"
    cuts_at_until = True
    drops_until = ("\n\n",)  # "to prevent truncation, which can lead to incorrect results" (the wrapper)
