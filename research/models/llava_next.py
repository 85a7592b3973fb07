"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres. Each image is a base view plus the crops
of the grid pinpoint that fits it best; the crops' features are un-padded to the image's aspect ratio
and an ``image_newline`` embedding ends every row, so the number of image tokens depends on the image.

``image_newline`` tokens carry the image token's id in ``input_ids`` like every other image token: the
engine treats them as image tokens, prunable and counted by the budget, as FastV / SparseVLM / PDrop do
on LLaVA-NeXT (the whole image span is their vision-token set). A scorer that ranks them low drops them.
"""

from __future__ import annotations

from typing import Any

from research.models.base import VisionLayout, VLMAdapter, register


@register
class LlavaNextAdapter(VLMAdapter):
    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    no_vision_merging = "anyres packs each crop's features into a grid with image_newline rows"
    lmms_eval_model = "llava_hf"
    cuts_at_until = False  # generate_until reads ``until`` and never applies it

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        size = config.vision_config.image_size
        per_view = (size // config.vision_config.patch_size) ** 2
        most_crops = max((h // size) * (w // size) for h, w in config.image_grid_pinpoints)
        return VisionLayout(
            config.text_config.num_hidden_layers, None,
            f"base view {per_view} + anyres crops ({per_view} each, up to {most_crops}) un-padded + image_newline "
            "per row: set by the image size", per_view * (1 + most_crops),
        )
