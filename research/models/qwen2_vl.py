"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): a ViT without CLS token whose 2x2 neighbouring
patches are merged into one image token; the image's resolution sets the token count
(``grid_t * grid_h * grid_w / spatial_merge_size^2``). The LLM uses multimodal 3-D rotary positions
(temporal, height, width): ``position_ids`` reach the decoder as ``[3, B, S]`` (``[4, B, S]`` with a text
row in front), and decode steps add the ``rope_deltas`` of the prefill. The engine slices positions on
their last axis, so pruned rows keep their original 3-D positions; renumbering (``positions=compact``)
has no 1-D meaning there and is refused."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from research.models.base import VisionLayout, VLMAdapter, random_text_sizes, register
from research.models.llava import left_padded


@register
class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    position_axes = 3
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

    @classmethod
    def random_config(cls, size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
        from transformers import Qwen2VLConfig

        tiny = size == "tiny"
        text = random_text_sizes(size, num_layers, num_kv_heads)
        half = text["hidden_size"] // text["num_attention_heads"] // 2  # rotary frequencies, split over t / h / w
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                                   "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}
        vision = dict(depth=2, embed_dim=32 if tiny else 256, hidden_size=text["hidden_size"], num_heads=4,
                      patch_size=2 if tiny else 14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=3, video_token_id=4,
                             vision_start_token_id=5, vision_end_token_id=6)

    @classmethod
    def random_inputs(cls, model: nn.Module, question_lengths: Sequence[int], seed: int = 0,
                      image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Rows whose images are ``image_sizes`` pixels (default 16x16 tiny / 224x224 mid): each one's
        patch grid ``(1, h / patch, w / patch)`` and ``h * w / (patch * merge)^2`` image tokens."""
        vision = model.config.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        default = 8 * patch * merge // 2 if patch == 2 else 16 * patch
        sizes = list(image_sizes) if image_sizes else [(default, default)] * len(question_lengths)
        grids = torch.tensor([(1, h // patch, w // patch) for h, w in sizes])
        counts = [int(t * h * w) // merge**2 for t, h, w in grids.tolist()]
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn((int(grids.prod(1).sum()), 3 * temporal * patch * patch), generator=g)
        config = model.config
        inputs = left_padded(model, counts, question_lengths, g, before=[config.vision_start_token_id],
                             after=[config.vision_end_token_id])
        types = (inputs["input_ids"] == config.image_token_id).long()  # 1 = image token
        return inputs | {"pixel_values": pixels, "image_grid_thw": grids, "mm_token_type_ids": types}
