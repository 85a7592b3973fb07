"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP ViT whose patches are the image tokens one to
one, an MLP projector and a LLaMA-style LLM; the shipped offline default ``shapes`` is one too."""

from __future__ import annotations

from typing import Any

from torch import nn

from research.models.base import VisionLayout, VLMAdapter, register


@register
class LlavaAdapter(VLMAdapter):
    family = "llava15"
    model_class = "LlavaForConditionalGeneration"
    has_cls_saliency = True
    lmms_eval_model = "llava_hf"
    cuts_at_until = False  # generate_until reads ``until`` and never applies it

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def vision_attention(self) -> tuple[nn.Module, nn.Module, int, float]:
        """The CLIP layer whose output feeds the projector: its CLS row ranks the patches (ATP's saliency)."""
        feature_layer = self.model.config.vision_feature_layer
        index = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
        layers = self.vision_tower.encoder.layers
        attn = layers[index if index < 0 else index - 1].self_attn  # hidden_states[i] is layers[i-1]'s output
        return attn.q_proj, attn.k_proj, attn.num_heads, float(attn.scale)

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        count = patches if getattr(config, "vision_feature_select_strategy", "default") == "default" else patches + 1
        return VisionLayout(config.text_config.num_hidden_layers, count, "one token per CLIP patch", count)
