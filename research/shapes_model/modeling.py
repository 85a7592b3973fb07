"""Architectures of the offline default: a small CLIP pair and a small LLaVA built on its vision tower.

Everything is a stock transformers class built from a config (``CLIPModel``,
``LlavaForConditionalGeneration`` with a ``CLIPVisionModel`` tower and a Llama LLM), so the
shipped checkpoint loads with ``from_pretrained`` and the pruning engine treats it like LLaVA-1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from research.data.shapes import COLOURS, GRID, IMAGE_SIZE, MAX_OBJECTS, PATCH_SIZE, SHAPES
from research.shapes_model.vocab import BOS, EOS, IMAGE, PAD, build_tokenizer

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])  # CLIPImageProcessor's defaults
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


@dataclass
class ShapesModelConfig:
    """Sizes of the offline default (defaults = the shipped model)."""

    vision_hidden: int = 128
    vision_layers: int = 4
    text_encoder_hidden: int = 128
    text_encoder_layers: int = 2
    projection_dim: int = 64
    llm_hidden: int = 128
    llm_layers: int = 8
    llm_heads: int = 4
    llm_intermediate: int = 384


def clip_config(cfg: ShapesModelConfig) -> CLIPConfig:
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=cfg.projection_dim,
    )
    text = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=cfg.text_encoder_hidden, intermediate_size=2 * cfg.text_encoder_hidden,
        num_hidden_layers=cfg.text_encoder_layers, num_attention_heads=4, max_position_embeddings=16,
        pad_token_id=tok.convert_tokens_to_ids(PAD), bos_token_id=tok.convert_tokens_to_ids(BOS),
        eos_token_id=tok.convert_tokens_to_ids(EOS), projection_dim=cfg.projection_dim,
    )
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.projection_dim
    )


def build_clip(cfg: ShapesModelConfig) -> CLIPModel:
    return CLIPModel(clip_config(cfg))


def build_llava(cfg: ShapesModelConfig, clip: CLIPModel) -> LlavaForConditionalGeneration:
    """A LLaVA whose vision tower is ``clip``'s (weights copied) and whose LLM is a fresh Llama."""
    tok = build_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
        num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_heads,
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=clip.config.vision_config.to_dict(), text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())  # both CLIPVisionModel
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


class DenseHeads(nn.Module):
    """Per-patch classifiers on the vision tower (auxiliary supervision): colour, shape, grid cell, and the
    number of objects in the image that have this patch's colour (the ViT attends globally, so each object
    patch can know it; the LLM then counts by finding one patch of the colour, not by how many are shown)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.colour = nn.Linear(hidden, len(COLOURS) + 1)  # 0 = background
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.cell = nn.Linear(hidden, GRID * GRID)
        self.colour_count = nn.Linear(hidden, MAX_OBJECTS + 1)  # 0 for background

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [B, P, D] -> 4 x [B, P, classes]
        return self.colour(patches), self.shape(patches), self.cell(patches), self.colour_count(patches)


def patch_cells() -> torch.Tensor:
    """[P] the grid cell (0..8, row-major) of each patch."""
    side = IMAGE_SIZE // PATCH_SIZE
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    per_cell = side // GRID
    return ((rows // per_cell) * GRID + cols // per_cell).reshape(-1)


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W], as the processor (no resize/crop) makes them."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    return (x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
