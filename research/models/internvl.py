"""InternVL in transformers' native format (``InternVLForConditionalGeneration``): an InternViT tower
whose patch grid is pixel-shuffled (``downsample_ratio`` 0.5 merges 2x2 patches into one token), an MLP
projector and a Qwen2 / LLaMA LLM. A tile gives ``(image_size / patch_size)^2 * downsample_ratio^2``
image tokens (256 for 448-pixel tiles). Its CLS attention ranks patches, not the merged tokens: no CLS
saliency."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from research.models.base import VisionLayout, VLMAdapter, random_text_sizes, register
from research.models.llava import left_padded


@register
class InternVLAdapter(VLMAdapter):
    family = "internvl"
    model_class = "InternVLForConditionalGeneration"
    lmms_eval_model = "internvl3"  # (``internvl2`` likewise)
    cuts_at_until = False  # generate_until pops ``until``

    @classmethod
    def tile_tokens(cls, config: Any) -> int:
        vision = config.vision_config
        size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
        return int((size // patch) ** 2 * config.downsample_ratio ** 2)

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        count = cls.tile_tokens(config)
        return VisionLayout(config.text_config.num_hidden_layers, count,
                            "one token per 2x2 pixel-shuffled patches of one tile", count)

    def fallback_prompt(self, question: str) -> str:
        return f"<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"

    @classmethod
    def random_config(cls, size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        tiny = size == "tiny"
        side = 16 if tiny else 224
        vision = InternVLVisionConfig(hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                                      num_hidden_layers=2, num_attention_heads=4, image_size=[side, side],
                                      patch_size=[2, 2] if tiny else [14, 14])
        text = Qwen2Config(**random_text_sizes(size, num_layers, num_kv_heads))
        return InternVLConfig(vision_config=vision, text_config=text, image_token_id=3, downsample_ratio=0.5)

    @classmethod
    def random_inputs(cls, model: nn.Module, question_lengths: Sequence[int], seed: int = 0,
                      image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        side = model.config.vision_config.image_size
        side = side[0] if isinstance(side, (list, tuple)) else side
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn((len(question_lengths), 3, side, side), generator=g)
        counts = [cls.tile_tokens(model.config)] * len(question_lengths)
        return left_padded(model, counts, question_lengths, g) | {"pixel_values": pixels}
