"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a ViT without CLS token whose 2x2 neighbouring
patches are merged into one image token; the image's resolution sets the token count
(``grid_t * grid_h * grid_w / spatial_merge_size^2``). The LLM uses multimodal 3-D rotary positions
(temporal, height, width): ``position_ids`` reach the decoder as ``[3, B, S]`` (``[4, B, S]`` with a text
row in front), and decode steps add the ``rope_deltas`` of the prefill. The engine slices positions on
their last axis, so pruned rows keep their original 3-D positions; renumbering (``positions=compact``)
has no 1-D meaning there and is refused."""

from __future__ import annotations

from typing import Any

from torch import nn

from research.models.base import VisionLayout, VLMAdapter, register


@register
class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    position_axes = 3
    no_vision_merging = "its tower merges 2x2 patches and its sequence is not a token list per image"
    lmms_eval_model = "qwen2_vl"
    cuts_at_until = True  # each answer is cut before its first stop string

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        merge = config.vision_config.spatial_merge_size
        patch = config.vision_config.patch_size
        nominal = (448 // (patch * merge)) ** 2  # a 448x448 image: 256 tokens at patch 14
        return VisionLayout(config.text_config.num_hidden_layers, None,
                            f"one token per {merge}x{merge} merged {patch}-pixel patches: set by the image resolution",
                            nominal)

    def fallback_prompt(self, question: str) -> str:
        return (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
