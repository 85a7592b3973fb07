"""Fixtures shared by the run tests: a micro LLaVA with the shapes tokenizer and processor (random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from research.shapes_model.modeling import ShapesModelConfig, build_clip, build_llava
from research.shapes_model.vocab import build_processor

MICRO = ShapesModelConfig(
    vision_hidden=32, vision_layers=1, text_encoder_hidden=32, text_encoder_layers=1, projection_dim=16,
    llm_hidden=32, llm_layers=4, llm_heads=2, llm_intermediate=64,
)


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    """The micro LLaVA saved to disk once per test module."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro_llava")
    clip = build_clip(MICRO)
    build_llava(MICRO, clip).save_pretrained(path)
    build_processor().save_pretrained(path)
    clip.save_pretrained(path / "clip")
    build_processor().tokenizer.save_pretrained(path / "clip")
    return path
