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

    def input_norm(self, layer_idx: int) -> nn.Module:
        """The norm decoder layer ``layer_idx`` applies to its input before attention (``input_layernorm``)."""
        return self.decoder_layers[layer_idx].input_layernorm

    def attention_scaling(self, layer_idx: int) -> float:
        return float(self.decoder_layers[layer_idx].self_attn.scaling)

    def vision_attention(self) -> tuple[nn.Module, nn.Module, int, float]:
        """(q_proj, k_proj, num_heads, scale) of the vision-tower layer whose output feeds the projector."""
        feature_layer = self.model.config.vision_feature_layer
        index = feature_layer[-1] if isinstance(feature_layer, (list, tuple)) else feature_layer
        layers = self.vision_tower.encoder.layers
        attn = layers[index if index < 0 else index - 1].self_attn  # hidden_states[i] is layers[i-1]'s output
        return attn.q_proj, attn.k_proj, attn.num_heads, float(attn.scale)

    @property
    def path(self) -> Path | None:
        """The local directory the model was loaded from, if any."""
        name = self.model.config.name_or_path
        return Path(name) if name and Path(name).is_dir() else None

    # ---- loading and inputs --------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        device: str | torch.device = "cpu",
    ) -> tuple[LlavaAdapter, Any]:
        """Load a local checkpoint directory (safetensors) and its processor; never downloads.

        Args:
            path: Local Hugging Face LLaVA checkpoint directory (``config.json`` + ``*.safetensors``
                + processor files).
            dtype: Dtype of the loaded weights.
            attn_implementation: Attention backend, e.g. ``"sdpa"`` or ``"eager"``.
            device: Device the model is moved to.

        Returns:
            ``(adapter, processor)``; the processor's tokenizer pads on the left.

        Raises:
            FileNotFoundError: If ``path`` is not a directory holding a ``config.json``.
        """
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: expected a local Hugging Face LLaVA checkpoint directory "
                "(config.json + *.safetensors)"
            )
        model = LlavaForConditionalGeneration.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
        )
        model = model.eval().to(device)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        processor.tokenizer.padding_side = "left"
        return cls(model), processor

    def build_inputs(self, processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict:
        """Batched, left-padded model inputs for (image, question) pairs in the model's chat format.

        Each prompt comes from the processor's chat template when it has one, otherwise from
        LLaVA-1.5's ``"USER: <image>\\n{question} ASSISTANT:"``; the processor expands ``<image>``
        to the model's number of image tokens.

        Args:
            processor: The model's ``LlavaProcessor`` (e.g. from :meth:`from_pretrained`).
            images: One image (e.g. a PIL image) per question.
            questions: The questions, one per image.

        Returns:
            A ``BatchFeature`` with ``input_ids``, ``attention_mask`` and ``pixel_values`` on the
            model's device, ``pixel_values`` in the model's dtype.
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        if getattr(processor, "chat_template", None):
            prompts = [
                processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                    add_generation_prompt=True,
                )
                for q in questions
            ]
        else:
            prompts = [f"USER: <image>\n{q} ASSISTANT:" for q in questions]
        inputs = processor(
            images=list(images), text=prompts, return_tensors="pt", padding=True, padding_side="left"
        )
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs


def adapter_for(model: nn.Module) -> LlavaAdapter:
    """The adapter for ``model``'s family (only LLaVA for now); a clear error otherwise."""
    from transformers import LlavaForConditionalGeneration

    if isinstance(model, LlavaForConditionalGeneration):
        return LlavaAdapter(model)
    raise TypeError(
        f"no pruning adapter for {type(model).__name__}; supported: ['LlavaForConditionalGeneration']"
    )
