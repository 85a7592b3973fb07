"""InternVL in transformers' native format (``InternVLForConditionalGeneration``): an InternViT tower
whose patch grid is pixel-shuffled (``downsample_ratio`` 0.5 merges 2x2 patches into one token), an MLP
projector and a Qwen2 / LLaMA LLM. A tile gives ``(image_size / patch_size)^2 * downsample_ratio^2``
image tokens (256 for 448-pixel tiles). Its CLS attention ranks patches, not the merged tokens: no CLS
saliency."""

from __future__ import annotations

from typing import Any

from research.models.base import VisionLayout, VLMAdapter, register


@register
class InternVLAdapter(VLMAdapter):
    family = "internvl"
    model_class = "InternVLForConditionalGeneration"
    no_vision_merging = "its image tokens are 2x2 pixel-shuffled patch grids"
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
