"""ToMe in the vision tower (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

In every CLIP encoder layer that feeds the language model, between attention and MLP, ``r`` tokens of
set A (even slots) are merged into their most similar token of set B (odd slots) by the cosine of the keys
averaged over heads (bipartite soft matching), as a size-weighted average:

    x_merged = sum_{i in group} s_i x_i / sum_{i in group} s_i,    s = patches per token,

with proportional attention ``softmax(q k^T / sqrt(d) + log s)``. The shortened feature sequence, ``k`` tokens
per image, enters the LLM (``research/pruning/vision_merge.py`` says where they sit and what the mask and KV
cache hold). ``score`` only marks the image slots holding merged tokens; the merge is done by the engine.

Reference code: facebookresearch/ToMe (``tome/merge.py``, ``tome/patch/timm.py``, ``tome/utils.py``), applied to
LLaVA as ModelTC/LightCompress does (``llmc/compression/token_reduction/tome.py``: it patches the ``r`` of each
CLIP encoder layer of LLaVA's vision tower). The two differ; ``reading`` picks one:

* ``reading="tome"`` (default): sizes carried from layer to layer and used as the merge weights, and
  proportional attention on (``apply_patch(prop_attn=True)``, the authors' setting for off-the-shelf models such
  as LLaVA's frozen CLIP). It is the method as published; LightCompress's differences read as simplifications;
* ``reading="lightcompress"``: every layer merges with sizes 1 (``hidden_states, _ = merge_wavg(merge,
  hidden_states)`` discards them) and attention is plain (its patched ``CLIPSdpaAttention`` adds no size bias).
  ``proportional_attention`` overrides the reading's choice.

The budget: the plan's interface keep count ``k`` is what the tower ends with (every LLM layer sees ``k``, so
the average retained tokens are ``k``). With ``r=None`` (default) the solver spreads the ``n - k`` merges over
the merging layers as ToMe's constant ``r``: ``(n - k) // L`` each, one more in each of the last
``(n - k) mod L`` layers (``research.pruning.token_merge.solve_r``); where ToMe's cap (half the tokens per layer)
stops a constant ``r`` short of ``k`` (a shallow tower, a small ``k``), each layer merges as many as the cap allows
until ``k`` (a decreasing schedule), and a ``k`` below what halving in every layer leaves is refused. On
LLaVA-1.5 (577 tokens, 23 merging layers) the constant ``r`` reaches every ``k`` from 24 to 576
(``k=64``: ``r=22`` in 17 layers, 23 in the last 6). An explicit ``r`` (int, or a per-layer list) with
``r_step`` (the second entry of either codebase's 2-tuple ``r``: ToMe's ``(r, inflection)``, LightCompress's
``(start, step)``, by ``reading``) is given per tower layer, as both codebases do, and must end at ``k``.

Differences from the reference code:

* the merging layers are those up to LLaVA's feature layer (``vision_feature_layer=-2``: all but the last);
  both codebases also merge in the last layer, whose output LLaVA never reads (same features, a little
  compute there); the token counts are therefore ``n - sum(r[:L-1])`` (LightCompress's ``r=16`` on
  LLaVA-1.5: 576 - 16 * 23 = 208);
* a layer's merge runs through hooks on transformers' CLIP layer (``vision_merge``), not a patched forward;
  the maths is the same (``tests/test_tome.py`` re-derives it);
* the tokens enter the LLM in ToMe's output order (``placement="merge"``, as both codebases on LLaVA) or
  at their first patch's slot in raster order (``placement="spatial"``, an option); their positions are
  the plan's (``positions=compact`` is LLaVA's consecutive numbering; ``original`` the slots' own);
* images are merged one by one with the same ``r`` (batching as ToMe's); rows must hold one image each.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from research.pruning.signals import Signals
from research.pruning.token_merge import R_READINGS, parse_r, solve_r, tokens_after
from research.pruning.vision_merge import PLACEMENTS, MergeOptions, VisionMergeSites
from scorers.base import SCORERS, Scorer


@SCORERS.register("tome")
@dataclass
class ToMe(Scorer):
    """Bipartite soft matching merges in the vision tower's layers; the merged tokens enter the LLM."""

    pre_llm = True
    needs_llm_attention = False
    needs_vision_merging = True

    reading: str = "tome"  # tome | lightcompress: sizes carried + proportional attention, or neither
    proportional_attention: bool | None = None  # None: the reading's (tome: on, lightcompress: off)
    r: int | list[int] | None = None  # None: solved from the budget; else merges per tower layer
    r_step: float | None = None  # with an int r: the 2-tuple's second entry (inflection or step, by reading)
    placement: str = "merge"  # merge (ToMe's output order) | spatial (first patch's slot)

    def __post_init__(self) -> None:
        if self.reading not in R_READINGS:
            raise ValueError(f"reading {self.reading!r} unknown; choose one of {list(R_READINGS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} unknown; choose one of {list(PLACEMENTS)}")
        if self.r_step is not None and not isinstance(self.r, int):
            raise ValueError(f"r_step goes with an int r (the 2-tuple (r, r_step)), got r={self.r!r}")

    def schedule(self, sites: VisionMergeSites, keep: int) -> list[int]:
        """Merges per merging layer that take the tower to ``keep`` image tokens (one line if impossible)."""
        protected = int(sites.class_token)
        kept_tokens = keep + sites.tower_tokens - sites.image_tokens  # in the tower, CLS included
        if self.r is None:
            return solve_r(sites.tower_tokens, kept_tokens - protected, len(sites.layers), protected)
        given = (self.r, self.r_step) if self.r_step is not None else self.r
        schedule = parse_r(sites.tower_layers, list(given) if isinstance(given, list) else given, self.reading)
        schedule = schedule[: len(sites.layers)]
        reached = tokens_after(sites.tower_tokens, schedule, protected)[-1] - (sites.tower_tokens - sites.image_tokens)
        if reached != keep:
            raise ValueError(f"tome r={given!r} ({self.reading} reading) merges the tower to {reached} image tokens, "
                             f"but the plan keeps {keep}: set the budget to {reached} or leave r unset")
        return schedule

    def merge_options(self, sites: VisionMergeSites, keep: int) -> MergeOptions:
        """What the engine's vision-tower merge runs (``research.pruning.vision_merge``)."""
        carry = self.reading == "tome"
        proportional = carry if self.proportional_attention is None else self.proportional_attention
        return MergeOptions(self.schedule(sites, keep), carry_sizes=carry, proportional_attention=proportional,
                            placement=self.placement)

    def score(self, signals: Signals) -> Tensor:
        """[B, V] patches merged into each image slot: the slots holding merged tokens rank first."""
        sizes = signals.interface.merged_sizes
        if sizes is None:
            raise RuntimeError("tome: the vision tower merged nothing in this forward (no pixel_values, or the "
                               "scorer was not given to a PruningEngine)")
        return sizes.float()
