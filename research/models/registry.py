"""Models by name: ``load_model("shapes")`` is the shipped offline default; others load from local paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from research.models.llava import LlavaAdapter
from research.registry import Registry

MODELS: Registry[Any] = Registry("model")
ASSETS = Path(__file__).resolve().parent.parent / "assets"


@MODELS.register("shapes")
def shapes_path(path: str | None = None) -> Path:
    """The offline default trained by ``python -m research.train_offline_model`` and shipped in the repo."""
    return Path(path) if path else ASSETS / "shapes"


@MODELS.register("llava15")
def llava15_path(path: str | None = None) -> Path:
    """LLaVA-1.5 (7B/13B, ``llava-hf`` format) from a local directory: ``model.path=/data/llava-1.5-7b-hf``."""
    if not path:
        raise ValueError("model llava15 needs model.path=<local llava-hf checkpoint directory>")
    return Path(path)


def load_model(
    name: str = "shapes",
    path: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[LlavaAdapter, Any]:
    """(adapter, processor) of the model called ``name``; never downloads."""
    directory = MODELS.get(name)(path)
    return LlavaAdapter.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation, device=device)
