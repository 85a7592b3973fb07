"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres with a SigLIP tower
(no CLS token: no CLS saliency) and a Qwen2 LLM. Image tokens, including the ``image_newline`` ones,
are set by the image size and are all prunable (see ``llava_next``)."""

from __future__ import annotations

from typing import Any

from research.models.base import random_text_sizes, register
from research.models.llava_next import LlavaNextAdapter


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    lmms_eval_model = "llava_onevision"  # (``llava_hf`` for the -hf checkpoints: the same, no cut)
    cuts_at_until = False  # generate_until pops ``until``

    @classmethod
    def random_config(cls, size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        next_config = super().random_config(size, num_layers, num_kv_heads)
        v = next_config.vision_config
        vision = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                    num_hidden_layers=2, num_attention_heads=4, image_size=v.image_size,
                                    patch_size=v.patch_size)
        text = Qwen2Config(**random_text_sizes(size, num_layers, num_kv_heads))
        return LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                    image_grid_pinpoints=next_config.image_grid_pinpoints, image_token_id=3,
                                    video_token_id=5, vision_feature_layer=-1)
