"""Idefics3 (``Idefics3ForConditionalGeneration``): a SigLIP tower (no CLS token: no CLS saliency) whose patch
grid is pixel-shuffled by the connector (``scale_factor`` s merges s x s patches into one token) and projected
into a LLaMA LLM. A crop gives ``(image_size / patch_size)^2 / s^2`` image tokens (169 for Idefics3-8B); the
processor splits a large image into rows x cols crops plus a downscaled global view, so the image's size sets
the count: ``(rows * cols + 1)`` crops' worth, in ``pixel_values`` ``[B, crops, 3, H, W]`` (a row with fewer
crops is padded with all-zero crops, which the model drops, and ``pixel_attention_mask``).

Prunable image tokens: the ``<image>`` tokens (``config.image_token_id``) of every crop and of the global view,
ranked and counted together. The processor's markers stay: ``<fake_token_around_image>`` around each crop, the
``<row_i_col_j>`` crop markers, ``<global-img>`` and the newlines between crop rows are text tokens to the engine
(another id), never ranked, pruned or counted by the budget (``tests/test_families.py``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from research.models.base import VisionLayout, VLMAdapter, register

# the processor's default longest edge is 4 crop sides (Idefics3: 4 * 364, SmolVLM: 4 * 512 or 4 * 384)
NOMINAL_CROPS = 4 * 4 + 1  # a square image: 4 x 4 crops and the global view


@register
class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    model_class = "Idefics3ForConditionalGeneration"
    no_vision_merging = "its image tokens are pixel-shuffled patch groups of several crops"
    # lmms-eval 0.7.3 has no Idefics3 / SmolVLM wrapper; its ``idefics2`` one (the same processor protocol and
    # chat format, loading only Idefics2) pops ``until`` and never applies it
    lmms_eval_model = "idefics2"
    cuts_at_until = False

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_model

    @property
    def projector(self) -> nn.Module:
        """The connector: pixel shuffle, then the projection into the LLM."""
        return self.model.model.connector

    @classmethod
    def crop_tokens(cls, config: Any) -> int:
        """Image tokens of one crop (or of the global view): its patches, ``scale_factor^2`` to a token."""
        vision = config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2

    @classmethod
    def vision_layout(cls, config: Any) -> VisionLayout:
        per_crop, scale = cls.crop_tokens(config), config.scale_factor
        return VisionLayout(
            config.text_config.num_hidden_layers, None,
            f"{per_crop} per {config.vision_config.image_size}-px crop ({scale}x{scale} patches pixel-shuffled into "
            "one) for each crop of the split image and the global view: set by the image size",
            per_crop * NOMINAL_CROPS,
        )

    def fallback_prompt(self, question: str) -> str:
        return f"<|begin_of_text|>User:<image>{question}<end_of_utterance>\nAssistant:"
