"""FLOPs estimates for pruned LLaVA inference, following AdaptInfer's complexity analysis (Eq. 5-7).

Notation (paper, "Analysis of Computational Complexity"): ``n = T + V`` is the sequence length
(text plus vision tokens), ``d`` the hidden size and ``m`` the FFN intermediate size. Counts are
multiply-accumulates as written in the paper, not multiplied by 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from research.pruning.plan import INTERFACE

VisionSpec = tuple[int, int, int, int]  # (num_patches, d_v, m_v, layers_v)


def prefill_layer_flops(n: int, d: int, m: int) -> float:
    """FLOPs of one decoder layer in the prefill stage, Eq. 5: ``4 n d^2 + 2 n^2 d + 3 n d m``.

    Args:
        n: Sequence length (text plus vision tokens) the layer runs on.
        d: Hidden size.
        m: FFN intermediate size (three ``d x m`` matrices in a gated MLP).

    Returns:
        The estimated FLOPs.
    """
    return float(4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m)


def prune_flops(num_text: int, num_vision: int) -> float:
    """Extra FLOPs of one in-LLM pruning step, Eq. 6: ``T^2 + 2 T V``.

    Args:
        num_text: Text tokens ``T``.
        num_vision: Vision tokens ``V`` entering the pruning layer.

    Returns:
        The estimated FLOPs.
    """
    return float(num_text**2 + 2 * num_text * num_vision)


def decode_layer_flops(n: int, d: int, m: int) -> float:
    """FLOPs of one decoder layer for one decoded token, Eq. 7: ``4 d^2 + 2 n d + 3 d m``.

    Args:
        n: Tokens held in that layer's KV cache (attended to by the new token).
        d: Hidden size.
        m: FFN intermediate size.

    Returns:
        The estimated FLOPs.
    """
    return float(4 * d**2 + 2 * n * d + 3 * d * m)


def vision_tower_flops(num_patches: int, d: int, m: int, layers: int) -> float:
    """FLOPs of a ViT vision tower: Eq. 5's attention terms with a two-matrix MLP.

    Per layer ``4 n d^2 + 2 n^2 d + 2 n d m`` with ``n = num_patches + 1`` (the CLS token).

    Args:
        num_patches: Image patches.
        d: Vision hidden size.
        m: Vision MLP intermediate size.
        layers: Vision transformer layers.

    Returns:
        The estimated FLOPs.
    """
    n = num_patches + 1
    return float(layers * (4 * n * d**2 + 2 * n**2 * d + 2 * n * d * m))


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one image-question forward.

    Attributes:
        prefill: LLM prefill (Eq. 5 over layers) including the pruning overhead (Eq. 6).
        vision: Vision tower (0 when not counted).
        decode_per_token: One decoded token over all layers (Eq. 7).
        total_prefill: ``prefill + vision``.
    """

    prefill: float
    vision: float
    decode_per_token: float
    total_prefill: float

    def ratio_to(self, other: FlopsReport) -> float:
        """``self.total_prefill / other.total_prefill`` (e.g. pruned relative to vanilla)."""
        return self.total_prefill / other.total_prefill


def estimate_flops(
    tokens_per_layer: Sequence[int],
    num_text: int,
    d: int,
    m: int,
    locations: Sequence[int],
    vision: VisionSpec | None = None,
    decode_tokens: int = 1,
) -> FlopsReport:
    """Estimate prefill, vision and per-token decode FLOPs for a pruning schedule (Eq. 5-7).

    Args:
        tokens_per_layer: Vision tokens each decoder layer runs on (``PruningPlan.tokens_per_layer``).
        num_text: Non-vision prompt tokens ``T``.
        d: LLM hidden size.
        m: LLM FFN intermediate size.
        locations: Pruning locations; ``l >= 0`` adds Eq. 6 with ``V = tokens_per_layer[l]``,
            ``-1`` (before the LLM) adds nothing since no LLM attention is used there.
        vision: ``(num_patches, d_v, m_v, layers_v)`` of the vision tower, or ``None`` to skip it.
        decode_tokens: Position of the decoded token; each layer's cache holds
            ``num_text + tokens_per_layer[l] + decode_tokens`` tokens.

    Returns:
        The ``FlopsReport``.
    """
    num_layers = len(tokens_per_layer)
    prefill = sum(prefill_layer_flops(num_text + v, d, m) for v in tokens_per_layer)
    for loc in locations:
        if loc == INTERFACE:
            continue
        if not 0 <= loc < num_layers:
            raise ValueError(f"pruning location {loc} out of range for a {num_layers}-layer LLM")
        prefill += prune_flops(num_text, tokens_per_layer[loc])
    decode = sum(decode_layer_flops(num_text + v + decode_tokens, d, m) for v in tokens_per_layer)
    vision_total = vision_tower_flops(*vision) if vision is not None else 0.0
    return FlopsReport(
        prefill=float(prefill),
        vision=vision_total,
        decode_per_token=float(decode),
        total_prefill=float(prefill) + vision_total,
    )


def vision_spec(adapter: Any) -> VisionSpec:
    """``(num_patches, d_v, m_v, layers_v)`` from ``adapter.model.config.vision_config``."""
    cfg = adapter.model.config.vision_config
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    return (num_patches, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)


def flops_for_model(
    adapter: Any,
    tokens_per_layer: Sequence[int],
    num_text: int,
    locations: Sequence[int],
) -> FlopsReport:
    """``estimate_flops`` with ``d``, ``m`` and the vision tower read from a ``LlavaAdapter``.

    Args:
        adapter: A ``LlavaAdapter`` (``hidden_size``, ``intermediate_size``, ``num_layers``, ``model``).
        tokens_per_layer: Vision tokens each decoder layer runs on; one entry per LLM layer.
        num_text: Non-vision prompt tokens.
        locations: Pruning locations (``-1`` = before the LLM).

    Returns:
        The ``FlopsReport`` (vision tower included).
    """
    if len(tokens_per_layer) != adapter.num_layers:
        raise ValueError(f"{len(tokens_per_layer)} token counts for a {adapter.num_layers}-layer LLM")
    return estimate_flops(
        tokens_per_layer,
        num_text,
        adapter.hidden_size,
        adapter.intermediate_size,
        locations,
        vision=vision_spec(adapter),
    )
