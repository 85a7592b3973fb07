"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP ViT whose patches are the image tokens one to
one, an MLP projector and a LLaMA-style LLM; the shipped offline default ``shapes`` is one too."""

from __future__ import annotations

from typing import Any

from torch import nn

from research.models.base import UnsupportedModel, VisionLayout, VisionMergeSites, VLMAdapter, register


@register
class LlavaAdapter(VLMAdapter):
    family = "llava15"
    model_class = "LlavaForConditionalGeneration"
    has_cls_saliency = True
    supports_vision_merging = True
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

    def vision_merge_sites(self) -> VisionMergeSites:
        """The CLIP encoder layers up to the feature layer (``vision_feature_layer``; LLaVA-1.5: -2, so all but the
        last) merge; the projector's output is spread back over the image's slots."""
        config = self.model.config
        feature_layer = config.vision_feature_layer
        if not isinstance(feature_layer, int):
            raise UnsupportedModel(f"vision_feature_layer={feature_layer}: features concatenated from several CLIP "
                                   "layers have different merged lengths; supported: one feature layer")
        layers = self.vision_tower.encoder.layers
        used = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer  # hidden_states[i]: i layers
        vision = config.vision_config
        return VisionMergeSites(
            tower=self.vision_tower, tower_layers=len(layers), layers=list(layers[:used]), projector=self.projector,
            num_heads=vision.num_attention_heads, tower_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
            image_tokens=self.vision_layout(config).image_tokens, class_token=True,
        )

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        count = patches if getattr(config, "vision_feature_select_strategy", "default") == "default" else patches + 1
        return VisionLayout(config.text_config.num_hidden_layers, count, "one token per CLIP patch", count)
