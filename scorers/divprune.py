"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR 2025).

Reference followed: the authors' repository vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``
(``pairwise_cosine_similarity``, ``DivPrune``, the ``LAYER_INDEX == '0'`` branch of
``prepare_inputs_labels_for_multimodal``), run by ``run_Divprune.sh`` (``LAYER_INDEX=0 SUBSET_RATIO=0.098``).

The kept set is a greedy solution of the max-min diversity problem over the image tokens as the LLM receives them
(the projector's output, ``inputs_embeds``), with the cosine distance ``d(i, j) = 1 - cos(x_i, x_j)``:

1. the first token is ``argmax_j`` of the second smallest entry of column ``j`` of ``d`` (``topk(2, dim=0,
   largest=False).values[1]``: its distance to its nearest other token, the smallest being its own ~0);
2. each next token is ``argmax_j min_{s in S} d(s, j)``, ``S`` the tokens chosen so far;

``torch.argmax`` breaks ties by the first index, as theirs. Their code then sorts the kept indices
(``keep_indexs.sort()``): the kept tokens enter the LLM in their original order, which is what the engine does
with any kept set; the selection order only decides which tokens are kept. ``score`` ranks the ``i``-th chosen
token ``n - i`` (higher = chosen earlier), so the engine's top-k is the first ``k`` chosen.

The distance is computed as theirs, in the embeddings' dtype, per row: ``x / x.norm(dim=1)``, ``torch.mm``,
``1.0 - ...``. The greedy stops at the plan's count (``keep_counts`` learns it; without it, ``score`` orders every
token, whose first ``k`` are the same, since step ``i`` does not depend on ``k``).

The layer-0 variant: ``LAYER_INDEX=0`` is the only pruning layer their code implements, and it prunes
``inputs_embeds`` before decoder layer 0, i.e. this scorer at location -1 (``pre_llm``); there is no other variant.

Positions: their code prunes the embeddings and passes ``position_ids=None`` (LLaVA builds none), so the LLM numbers
the shortened sequence consecutively: their reading is ``positions: compact``.

Budget: their ``SUBSET_RATIO`` keeps ``int(round(ratio * n))`` tokens (0.098 of 576: 56); here the plan's count at
location -1 is the number kept, every LLM layer runs on it.

Families: no CLS token and no attention needed, only the image embeddings the LLM receives: every family.

Differences from their code:

* their code handles one sample (batch element 0, a fixed ``SYS_TOKEN_LEN = 35`` text prefix before one image);
  here each row of a left-padded batch selects among its own image tokens (found by the image token id),
  padding entries never enter the distance matrix;
* every image token of a row is one set (their LLaVA-1.6 branch also selects among all of the first image's
  tokens, newline tokens included; several images in a row are one pool here);
* a token already chosen is never chosen again (their ``argmax`` could only pick one again if its
  self-distance, ~0, were the largest remaining min-distance, i.e. all remaining tokens duplicate chosen ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


def cosine_distance(features: Tensor) -> Tensor:
    """[N, N] ``1 - cos`` of [N, D] features, as DivPrune's ``pairwise_cosine_similarity`` computes it."""
    unit = features / features.norm(dim=1, keepdim=True)
    return 1.0 - torch.mm(unit, unit.t())


def padded_distances(vision_embeds: Tensor, valid: Tensor) -> Tensor:
    """[B, V, V] float32 cosine distances of each row's valid tokens (computed in the embeddings' dtype);
    ``+inf`` where either token is padding."""
    batch, num = valid.shape
    distances = vision_embeds.new_full((batch, num, num), float("inf"), dtype=torch.float32)
    for b in range(batch):
        index = valid[b].nonzero()[:, 0]
        block = cosine_distance(vision_embeds[b, index]).float()
        distances[b, index[:, None], index[None, :]] = block
    return distances


def max_min_order(distances: Tensor, valid: Tensor, steps: int) -> Tensor:
    """[B, steps] the tokens DivPrune's greedy chooses, in order (-1 once a row has no valid token left)."""
    batch, num = valid.shape
    rows = torch.arange(batch, device=valid.device)
    order = torch.full((batch, steps), -1, dtype=torch.long, device=valid.device)
    available = valid.clone()
    # step 0: each column's second smallest distance (its nearest other token); then the min over chosen rows
    candidate = distances.topk(min(2, num), dim=1, largest=False).values[:, -1]  # [B, V]
    for step in range(steps):
        chosen = candidate.masked_fill(~available, float("-inf")).argmax(dim=1)  # [B] first max on ties
        order[:, step] = torch.where(available.any(dim=1), chosen, -1)
        available[rows, chosen] = False
        row_of_chosen = distances[rows, chosen]  # [B, V] d(s, j)
        candidate = row_of_chosen if step == 0 else torch.minimum(candidate, row_of_chosen)
    return order


def order_scores(order: Tensor, num: int) -> Tensor:
    """[B, V] float scores that rank chosen tokens first, in choice order (``steps - i``), the others 0."""
    batch, steps = order.shape
    rank = (steps - torch.arange(steps, device=order.device, dtype=torch.float32)).expand(batch, steps)
    scores = torch.zeros(batch, num + 1, device=order.device)
    return scores.scatter_(1, order.masked_fill(order < 0, num), rank)[:, :num]


@SCORERS.register("divprune")
@dataclass
class DivPrune(Scorer):
    """Max-min diversity (greedy) over the image embeddings the LLM receives, before the LLM."""

    pre_llm = True
    needs_llm_attention = False
    _planned: list[int] | None = field(default=None, init=False, repr=False)

    def keep_counts(self, signals: Signals, planned: list[int]) -> list[int]:
        """The plan's counts, unchanged; remembered so the greedy stops there."""
        self._planned = list(planned)
        return planned

    def score(self, signals: Signals) -> Tensor:
        valid = signals.vision_valid
        planned, self._planned = self._planned, None
        steps = max(planned) if planned else signals.num_vision
        distances = padded_distances(signals.vision_embeds, valid)
        order = max_min_order(distances, valid, min(steps, signals.num_vision))
        return order_scores(order, signals.num_vision)
