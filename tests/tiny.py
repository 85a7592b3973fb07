"""Tiny LLaVA models built from config objects (random weights, no downloads) and their inputs."""

from __future__ import annotations

import torch
from torch import nn

from research.models.testing import left_pad, random_model

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
VOCAB_SIZE = 64
IMAGE_SIZE = 32
PATCH_SIZE = 4
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64
# summary columns that vary between identical runs (wall times, memory): left out when comparing summaries
TIMING_COLUMNS = {"prefill_ms", "prefill_p90_ms", "decode_ms_per_token", "scoring_ms", "peak_memory_mb", "eval_s",
                  "analysis_s"}


def tiny_llava(
    attn_implementation: str = "sdpa",
    num_layers: int = 6,
    num_kv_heads: int = 4,
    seed: int = 0,
    vision_layers: int | None = None,
) -> nn.Module:
    """A 6-layer LLaVA-1.5 with 64 image tokens; ``num_kv_heads < 4`` gives grouped-query attention;
    ``vision_layers``: a deeper vision tower than its 2 layers (merging inside it: ``tome``)."""
    return random_model("llava15", num_layers=num_layers, num_kv_heads=num_kv_heads,
                        attn_implementation=attn_implementation, seed=seed, vision_layers=vision_layers)


def tiny_inputs(question_lengths: list[int], seed: int = 0, prefix_length: int = 3) -> dict[str, torch.Tensor]:
    """Left-padded ``[prefix] <image>*64 [question]`` rows, one per question length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in question_lengths:
        prefix = torch.randint(4, VOCAB_SIZE, (prefix_length,), generator=g)
        question = torch.randint(4, VOCAB_SIZE, (n,), generator=g)
        image = torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN_ID)
        rows.append(torch.cat([torch.tensor([BOS_TOKEN_ID]), prefix, image, question]))
    pixel_values = torch.randn((len(rows), 3, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    return {**left_pad(rows, PAD_TOKEN_ID), "pixel_values": pixel_values}


def row(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Row ``i`` of a left-padded batch, alone and without its padding."""
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i][keep][None],
        "attention_mask": inputs["attention_mask"][i][keep][None],
        "pixel_values": inputs["pixel_values"][i : i + 1],
    }


def plan(cfg, num_layers: int, num_vision: int, histograms=None, allow_pending: bool = False):
    """The combinations of ``cfg`` planned for a model of this shape, without its checkpoint."""
    from research.sweep import plan_sweep

    return plan_sweep(shaped(cfg, num_layers, num_vision), histograms, allow_pending)


def shaped(cfg, num_layers: int = 8, num_vision: int = 144):
    """``cfg`` resolved for a model of this shape, without its checkpoint (plans and fingerprints)."""
    from research.experiment import ModelSpec, resolve

    return resolve(cfg, ModelSpec.of_shape(cfg.model, num_layers, num_vision))
