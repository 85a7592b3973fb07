"""Qwen3-VL MoE (``Qwen3VLMoeForConditionalGeneration``): Qwen3-VL with mixture-of-experts MLPs in its language
model; attention, positions, token layout and DeepStack as in ``qwen3_vl``."""

from __future__ import annotations

from research.models.base import register
from research.models.qwen3_vl import Qwen3VLAdapter


@register
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_class = "Qwen3VLMoeForConditionalGeneration"
