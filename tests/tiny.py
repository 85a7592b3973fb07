"""Tiny LLaVA models built from config objects (random weights, no downloads) and their inputs."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
VOCAB_SIZE = 64
IMAGE_SIZE = 32
PATCH_SIZE = 4
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64


def tiny_llava(
    attn_implementation: str = "sdpa",
    num_layers: int = 6,
    num_kv_heads: int = 4,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A 6-layer LLaVA with 64 image tokens; ``num_kv_heads < 4`` gives grouped-query attention."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID, bos_token_id=BOS_TOKEN_ID, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None  # never stop early: generated lengths stay comparable
    return model


def tiny_inputs(question_lengths: list[int], seed: int = 0, prefix_length: int = 3) -> dict[str, torch.Tensor]:
    """Left-padded ``[prefix] <image>*64 [question]`` rows, one per question length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in question_lengths:
        prefix = torch.randint(4, VOCAB_SIZE, (prefix_length,), generator=g)
        question = torch.randint(4, VOCAB_SIZE, (n,), generator=g)
        image = torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN_ID)
        rows.append(torch.cat([torch.tensor([BOS_TOKEN_ID]), prefix, image, question]))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1
    pixel_values = torch.randn((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def row(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Row ``i`` of a left-padded batch, alone and without its padding."""
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i][keep][None],
        "attention_mask": inputs["attention_mask"][i][keep][None],
        "pixel_values": inputs["pixel_values"][i : i + 1],
    }
