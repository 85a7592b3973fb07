"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP ViT whose patches are the image tokens one to
one, an MLP projector and a LLaMA-style LLM; the shipped offline default ``shapes`` is one too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from research.models.base import VisionLayout, VLMAdapter, random_text_sizes, register


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

    @classmethod
    def random_config(cls, size: str, num_layers: int | None, num_kv_heads: int | None) -> Any:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        tiny = size == "tiny"
        vision = CLIPVisionConfig(
            hidden_size=32 if tiny else 256, intermediate_size=64 if tiny else 512, num_hidden_layers=2,
            num_attention_heads=4, image_size=32 if tiny else 336, patch_size=4 if tiny else 14, projection_dim=32,
        )
        text = LlamaConfig(**random_text_sizes(size, num_layers, num_kv_heads))
        return LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")

    @classmethod
    def random_inputs(cls, model: nn.Module, question_lengths: Sequence[int], seed: int = 0,
                      image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        vision = model.config.vision_config
        count = cls.vision_layout(model.config).image_tokens
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn((len(question_lengths), 3, vision.image_size, vision.image_size), generator=g)
        return left_padded(model, [count] * len(question_lengths), question_lengths, g) | {"pixel_values": pixels}


def left_padded(model: nn.Module, image_counts: Sequence[int], question_lengths: Sequence[int],
                generator: torch.Generator, prefix_length: int = 3, before: Sequence[int] = (),
                after: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` of rows ``[BOS, prefix, before, image*n, after, question]``,
    left-padded; random text ids avoid every special id of the model's config."""
    config = model.config
    pad, bos = config.text_config.pad_token_id, config.text_config.bos_token_id
    special = {getattr(config, key, None) for key in dir(config) if key.endswith(("token_id", "token_index"))}
    vocab = config.text_config.vocab_size
    allowed = torch.tensor([i for i in range(4, min(vocab, 64)) if i not in special])
    rows = []
    for count, n in zip(image_counts, question_lengths):
        prefix = allowed[torch.randint(len(allowed), (prefix_length,), generator=generator)]
        question = allowed[torch.randint(len(allowed), (n,), generator=generator)]
        image = torch.full((count,), config.image_token_id)
        rows.append(torch.cat([torch.tensor([bos]), prefix, torch.tensor(list(before), dtype=torch.long), image,
                               torch.tensor(list(after), dtype=torch.long), question]))
    return left_pad(rows, pad)


def left_pad(rows: Sequence[torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` [B, S] of token rows of different lengths, padded on the left."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
