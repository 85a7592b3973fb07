"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres. Each image is a base view plus the crops
of the grid pinpoint that fits it best; the crops' features are un-padded to the image's aspect ratio
and an ``image_newline`` embedding ends every row, so the number of image tokens depends on the image.

``image_newline`` tokens carry the image token's id in ``input_ids`` like every other image token: the
engine treats them as image tokens, prunable and counted by the budget, as FastV / SparseVLM / PDrop do
on LLaVA-NeXT (the whole image span is their vision-token set). A scorer that ranks them low drops them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from research.models.base import VisionLayout, VLMAdapter, random_text_sizes, register
from research.models.llava import left_padded


@register
class LlavaNextAdapter(VLMAdapter):
    family = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
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

    @classmethod
    def random_config(cls, size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

        tiny = size == "tiny"
        view = 16 if tiny else 112
        vision = CLIPVisionConfig(hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512,
                                  num_hidden_layers=2, num_attention_heads=4, image_size=view,
                                  patch_size=4 if tiny else 7, projection_dim=32)
        text = LlamaConfig(**random_text_sizes(size, num_layers, num_kv_heads))
        pinpoints = [[view, 2 * view], [2 * view, view], [2 * view, 2 * view]]
        return LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                               image_token_id=3, vision_feature_layer=-2)

    @classmethod
    def random_inputs(cls, model: nn.Module, question_lengths: Sequence[int], seed: int = 0,
                      image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Rows whose images have ``image_sizes`` (default: all the base view's size); their token counts
        are the model's own (``get_image_features``), so rows of different sizes differ."""
        view = model.config.vision_config.image_size
        sizes = torch.tensor(list(image_sizes) if image_sizes else [(view, view)] * len(question_lengths))
        most_crops = max((h // view) * (w // view) for h, w in model.config.image_grid_pinpoints)
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn((len(question_lengths), 1 + most_crops, 3, view, view), generator=g)
        with torch.no_grad():
            features = model.model.get_image_features(pixels, sizes, return_dict=True).pooler_output
        counts = [len(f) for f in features]
        return left_padded(model, counts, question_lengths, g) | {"pixel_values": pixels, "image_sizes": sizes}
