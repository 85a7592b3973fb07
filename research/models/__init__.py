"""Model adapters: where one model family keeps its decoder layers, vision tower and image tokens."""

from research.models.llava import LlavaAdapter, adapter_for

__all__ = ["LlavaAdapter", "adapter_for"]
