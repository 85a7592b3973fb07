"""Model families: one adapter module each, registered by name in ``FAMILIES`` (see ``base``).

Importing the package imports every module in it (:func:`research.registry.discover`): a new family is one new
file. Random-weight models and inputs of every family (tests, benchmarks) are in ``research.models.testing``.
"""

from research.registry import discover

# ``registry`` names a model per family, so it comes after them; ``testing`` is imported by those who use it.
discover(__name__, __path__, skip=("registry", "testing"))

from research.models.base import (  # noqa: E402
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
