"""Adapter for transformers' ``LlavaForConditionalGeneration`` (the LLaVA-1.5 family).

The engine never touches model internals directly: everything it needs (decoder layers, the
multimodal wrapper that sees ``input_ids``, the rotary embedding, the attention projections,
the image token id) is looked up here, so another model family only needs another adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class LlavaAdapter:
    """Locates the parts of a ``LlavaForConditionalGeneration`` the pruning engine hooks into."""

    def __init__(self, model: nn.Module) -> None:
        from transformers import LlavaForConditionalGeneration

        if not isinstance(model, LlavaForConditionalGeneration):
            raise TypeError(f"LlavaAdapter needs a LlavaForConditionalGeneration, got {type(model).__name__}")
        self.model = model
        text_config = model.config.text_config
        self.num_layers: int = text_config.num_hidden_layers
        self.num_heads: int = text_config.num_attention_heads
        self.num_kv_heads: int = text_config.num_key_value_heads
        self.hidden_size: int = text_config.hidden_size
        self.intermediate_size: int = text_config.intermediate_size
        self.head_dim: int = getattr(text_config, "head_dim", None) or self.hidden_size // self.num_heads
        self.image_token_id: int = model.config.image_token_id

    # ---- modules the engine hooks ------------------------------------------------------------
    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids`` (image positions are read there)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack; its forward pre-hook is the vision-language interface."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def rotary_emb(self) -> nn.Module:
        return self.language_model.rotary_emb

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def attention_projections(self, layer_idx: int) -> tuple[nn.Module, nn.Module]:
        """(q_proj, k_proj) of decoder layer ``layer_idx``: their outputs are the layer's own Q and K."""
        attn = self.decoder_layers[layer_idx].self_attn
        return attn.q_proj, attn.k_proj

    def attention_scaling(self, layer_idx: int) -> float:
        return float(self.decoder_layers[layer_idx].self_attn.scaling)

    # ---- loading and inputs --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
    ) -> tuple[LlavaAdapter, Any]:
        """Load a local checkpoint directory (safetensors) and its processor; never downloads."""
        raise NotImplementedError

    def build_inputs(self, processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict:
        """Batched, left-padded model inputs for (image, question) pairs in the model's chat format."""
        raise NotImplementedError


def adapter_for(model: nn.Module) -> LlavaAdapter:
    """The adapter for ``model``'s family (only LLaVA for now); a clear error otherwise."""
    from transformers import LlavaForConditionalGeneration

    if isinstance(model, LlavaForConditionalGeneration):
        return LlavaAdapter(model)
    raise TypeError(
        f"no pruning adapter for {type(model).__name__}; supported: ['LlavaForConditionalGeneration']"
    )
