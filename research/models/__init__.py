"""Model adapters: where one model family keeps its decoder layers, vision tower and image tokens."""

from research.models.llava import LlavaAdapter, adapter_for
from research.models.registry import MODELS, load_model

__all__ = ["MODELS", "LlavaAdapter", "adapter_for", "load_model"]
