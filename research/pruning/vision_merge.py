"""Token merging inside a VLM's vision tower, through forward hooks only (the maths: ``token_merge``).

ToMe merges between a block's attention and its MLP (facebookresearch/ToMe ``tome/patch/timm.py``,
``ToMeBlock.forward``): ``x = x + attn(norm1(x)); x = merge(x); x = x + mlp(norm2(x))``. A transformers
encoder layer (CLIP, SigLIP) computes the same without the merge, with its residuals in local variables, so
the hooks on each merging layer run it as follows:

* layer, pre-hook: with proportional attention, adds ``log(size)`` of each key to the attention mask
  argument (ToMe's ``attn + size.log()``; the vision tower passes no mask of its own);
* ``k_proj``, forward hook: the matching metric, the keys averaged over heads;
* ``layer_norm2``, pre-hook: its input is ``x + attn``; the merge is computed and ``layer_norm2`` and the
  MLP run on the merged tokens only (ToMe's MLP cost);
* ``mlp``, forward hook: keeps the MLP output and hands the layer a zero, so its residual add is harmless;
* layer, forward hook (first of its hooks, before transformers' hidden-state capture): the output is
  ``merged + mlp(norm2(merged))``, exactly ToMe's block.

Only the layers whose output reaches the language model merge (LLaVA reads ``hidden_states[-2]``: the
last layer's merge would be wasted). The projector's output, ``k`` merged tokens per image, is then
written into the first ``k`` slots of the image's ``n`` (``placement="merge"``: ToMe's output order) or
into the slot of each merged token's first patch (``placement="spatial"``: raster order); the other slots
are left empty (zeros) and the engine drops them at the vision-language interface, so the language model,
its mask and its KV cache hold the ``k`` merged tokens only. Their positions are the plan's: ``original``
gives each merged token its slot's position (with ``placement="merge"`` the image span's first ``k``
positions, the text after it keeping its own); ``compact`` numbers the shortened sequence consecutively,
which is what LLaVA's codebase (and so LightCompress) gives features shortened before the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from research.models.base import VisionMergeSites
from research.pruning.token_merge import Merge, bipartite_soft_matching, merge_source, merge_wavg

__all__ = ["PLACEMENTS", "MergeOptions", "VisionMergeSites", "VisionTowerMerge"]

PLACEMENTS = ("merge", "spatial")


@dataclass
class MergeOptions:
    """How the tower merges (``scorers/tome.py`` documents the readings)."""

    schedule: list[int]  # r per layer of ``VisionMergeSites.layers``
    carry_sizes: bool = True  # sizes carried across layers (ToMe) or reset to 1 in every layer (LightCompress)
    proportional_attention: bool = True  # add log(patches per key) to the attention logits (ToMe)
    placement: str = "merge"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} unknown; choose one of {list(PLACEMENTS)}")


class VisionTowerMerge:
    """The hooks of ToMe in a vision tower; ``slot_sizes`` hands the latest image batch's result to the engine.

    The result is kept per engine, not per forward: ``generate()`` may encode the images before the
    multimodal model's forward starts.
    """

    def __init__(self, sites: VisionMergeSites, options: MergeOptions) -> None:
        if len(options.schedule) != len(sites.layers):
            raise ValueError(f"{len(options.schedule)} merge counts for {len(sites.layers)} merging layers")
        self.sites, self.options = sites, options
        self._size: Tensor | None = None  # [images, T, 1] patches per token (what the weights use)
        self._count: Tensor | None = None  # [images, T, 1] patches per token, always carried (the record)
        self._source: Tensor | None = None  # [images, T, N] (spatial placement only)
        self._metric: Tensor | None = None
        self._merged: Tensor | None = None
        self._mlp_out: Tensor | None = None
        self._result: Tensor | None = None  # [images, n] patches per image slot (0: empty slot)

    @property
    def active(self) -> bool:
        return any(r > 0 for r in self.options.schedule)

    def install(self) -> list[Any]:
        """Registers the hooks; returns their handles (nothing when no layer merges)."""
        if not self.active:
            return []
        sites = self.sites
        handles = [sites.tower.register_forward_pre_hook(self._start),
                   sites.projector.register_forward_hook(self._place)]
        first = next(i for i, r in enumerate(self.options.schedule) if r > 0)
        for index, (layer, r) in enumerate(zip(sites.layers, self.options.schedule)):
            if self.options.proportional_attention and index > first:
                handles.append(layer.register_forward_pre_hook(self._size_bias, with_kwargs=True))
            if r > 0:
                handles += [
                    layer.self_attn.k_proj.register_forward_hook(self._keep_metric),
                    layer.layer_norm2.register_forward_pre_hook(self._merge_hook(r)),
                    layer.mlp.register_forward_hook(self._keep_mlp),
                    layer.register_forward_hook(self._layer_output, prepend=True),
                ]
        return handles

    def take(self) -> Tensor | None:
        """[images, n] patches held by each image slot after the last image batch (0: an empty slot)."""
        result, self._result = self._result, None
        return result

    def slot_sizes(self, vision_valid: Tensor, keep: list[int]) -> Tensor | None:
        """[B, V] patches per image slot of each row (images in row order, as the model scatters them), checked
        against the rows' keep counts ``keep``; None if no image batch was merged."""
        result = self.take()
        if result is None:
            return None
        if result.numel() != int(vision_valid.sum()):
            raise RuntimeError(f"the merged vision tower gave {result.numel()} image slots for "
                               f"{int(vision_valid.sum())} image tokens in the input")
        sizes = torch.zeros(vision_valid.shape, dtype=result.dtype, device=result.device)
        sizes[vision_valid] = result.flatten()
        held = (sizes > 0).sum(1).tolist()
        if held != keep:
            raise ValueError(f"the vision tower merged rows to {held} tokens but the plan keeps {keep}: tome merges "
                             "each image alone, so each row must hold one image")
        return sizes

    # ---- hooks ---------------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple) -> None:
        self._size = self._count = self._source = None

    def _size_bias(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Proportional attention: ``log(size)`` of each key added to the logits (ToMe's ``ToMeAttention``)."""
        if self._count is None:
            return None
        bias = self._count.log()[:, None, None, :, 0].to(args[0].dtype)  # [images, 1, 1, T]
        if len(args) > 1:
            mask = args[1]
            return (args[0], bias if mask is None else mask + bias, *args[2:]), kwargs
        mask = kwargs.get("attention_mask")
        return args, {**kwargs, "attention_mask": bias if mask is None else mask + bias}

    def _keep_metric(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        batch, tokens, _ = output.shape
        self._metric = output.view(batch, tokens, self.sites.num_heads, -1).mean(2)  # ToMe: k.mean(1) over heads

    def _merge_hook(self, r: int) -> Any:
        def merge_before_mlp(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]  # [images, T, Dv]: the layer's x + attn(norm1(x))
            merge = bipartite_soft_matching(self._metric, r, self.sites.class_token)
            self._metric = None
            if merge is None:
                self._merged = x
                return None
            self._track(merge, x)
            x, size = merge_wavg(merge, x, self._size if self.options.carry_sizes else None)
            self._size = size if self.options.carry_sizes else None
            self._merged = x
            return (x, *args[1:])

        return merge_before_mlp

    def _track(self, merge: Merge, x: Tensor) -> None:
        """Group sizes (always) and sources (spatial placement) of the tokens after ``merge``."""
        count = self._count if self._count is not None else torch.ones_like(x[..., :1])
        self._count = merge(count, mode="sum")
        if self.options.placement == "spatial":
            self._source = merge_source(merge, x, self._source)

    def _keep_mlp(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        self._mlp_out = output
        return output.new_zeros(())  # the layer adds it to its full-length residual: discarded below

    def _layer_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        merged, mlp_out = self._merged, self._mlp_out
        self._merged = self._mlp_out = None
        hidden = merged + mlp_out
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _place(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Writes the ``k`` merged tokens [images, k, D] into the image's ``n`` slots; records their sizes."""
        if self._count is None:
            return output
        images, k, width = output.shape
        n = self.sites.image_tokens
        offset = self._count.shape[1] - k  # the CLS token the feature selection dropped (LLaVA "default")
        count = self._count[:, offset:, 0]  # [images, k]
        if self.options.placement == "merge":
            slots = torch.arange(k, device=output.device).expand(images, k)
        else:
            first_patch = self._source[:, offset:].argmax(-1) - (self.sites.tower_tokens - n)  # [images, k]
            slots = first_patch
        placed = output.new_zeros(images, n, width).scatter(1, slots[..., None].expand(images, k, width), output)
        self._result = count.new_zeros(images, n).scatter(1, slots, count)
        self._size = self._count = self._source = None
        return placed
