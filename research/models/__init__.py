"""Model families: one adapter module each, registered by name in ``FAMILIES`` (see ``base``)."""

# Importing the modules registers their families.
from research.models import internvl, llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl  # noqa: E402,F401,I001
from research.models.base import (
    FAMILIES,
    UnsupportedModel,
    VisionLayout,
    VLMAdapter,
    adapter_for,
    family_of_class,
    family_of_config,
)
from research.models.llava import LlavaAdapter  # noqa: E402
from research.models.registry import MODELS, load_model  # noqa: E402

__all__ = [
    "FAMILIES",
    "MODELS",
    "LlavaAdapter",
    "UnsupportedModel",
    "VLMAdapter",
    "VisionLayout",
    "adapter_for",
    "family_of_class",
    "family_of_config",
    "load_model",
]
