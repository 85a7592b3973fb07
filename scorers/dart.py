"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
2025), training-free, inside the LLM.

Reference followed: the authors' repository ZichenWen1/DART (not fetchable here; read in the copy VTC-Bench vendors,
``external/DART``): ``llava/model/language_model/modeling_llama_self.py`` (``DART.forward``,
``DART.get_retained_image_token``), run by ``scripts/v1_5/eval/*.sh`` (``--pruned_layer 2 --pivot_image_token 4
--pivot_text_token 4 --max_num_trunction 128``); its Qwen2-VL port (``Qwen2VL_DART/modeling_qwen2_vl_self.py``)
selects the same way.

Before decoder layer ``K`` (2: after layer 1, location ``K - 1`` here), per sample, from layer ``K - 1``'s outputs:

1. pivots: the ``pivot_image_token`` image tokens and the ``pivot_text_token`` tokens after the image with the
   largest L1 norm of their keys (after the rotary embedding and ``repeat_kv``: the ``key_states`` the attention
   returns, flattened over heads);
2. ``indices_set = set(image_pivots + text_pivots)``; for each pivot in that set's iteration order (a Python set of
   positions: the order their code runs, which decides which pivot takes a contested token), the ``TOKEN_TOPK``
   remaining image tokens least cosine-similar to it in ``norm(h)`` (the layer output through the LLM's final norm)
   join the set and leave the candidates;
3. the text pivots leave the set: the image pivots and the tokens they and the text pivots chose are kept, in their
   original order and with their original position ids (``position_ids = keep_indexs``: ``positions: original``).

This scorer runs that loop literally (Python sets of the same positions, the same tensor ops in the model's dtype,
``topk`` for every choice), so ties fall as in their code. ``score`` is 1 on the kept image tokens, 0 elsewhere.

Budget (``budget``), where their code and an equal-token comparison differ:

* ``"planned"`` (default): the kept set has exactly the plan's count ``k``, as every other method here, so rows
  compare at the same average tokens: the ``k - pivots`` chosen tokens are shared among the pivots, ``(k -
  pivot_image_token) // P`` each (``P`` pivots), and the first ``(k - pivot_image_token) % P`` pivots in the set's
  order take one more;
* ``"code"``: their ``--max_num_trunction k``: ``TOKEN_TOPK = k // P`` per pivot, so DART keeps ``pivot_image_token +
  P * (k // P)`` image tokens: 196, 132, 68 for the 192, 128, 64 its tables name (8 pivots). ``keep_counts``
  reports that count, so the run's token figures are what ran.

The default is ``planned`` because a comparison table at "64 tokens" should hold every method to 64; ``code``
reproduces their published rows (4 more tokens than named). Their Qwen2-VL port's ``int(V * (1 - ratio) / P)`` is
the same per-pivot count for the ratio that gives ``k``.

Layer: their scripts prune before layer 2 of LLaVA-1.5-7B's 32 (``--pruned_layer 2``, also their Qwen2-VL
script's ``pruned_layer=2``); LightCompress's DART config takes ``pruning_loc`` as a setting. Here the schedule
says where: ``{name: layers, layers: [2], scale_from: 32, prune_before: true}`` is theirs (``experiments/
paper_sota.yaml``); any location after a decoder layer works.

Families: DART needs only the LLM's keys and hidden states, no CLS token: every family.

Differences from their code:

* their code is one sample at a time (``assert batch_size == 1``) with fixed ``image_token_start_index`` (35) and
  ``image_token_length`` (576); here each row of a left-padded batch runs the same loop on its own tokens (padding
  left out; positions are counted from the row's first real token, as theirs in a batch of one), image positions
  are read from ``input_ids`` and the text pivots come from the row's tokens after its last image token;
* several images in a row (or image tokens not in one block) are one candidate pool here; their code assumes one
  contiguous block;
* a pivot asking for more tokens than remain takes what remains (their ``topk`` would fail);
* with fewer than ``pivot_image_token`` budgeted tokens (``planned``), only the ``k`` image pivots of largest key
  norm are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer

BUDGETS = ("planned", "code")
CODE_DEFAULT_KEEP = 128  # their --max_num_trunction default, used only when score runs without the plan's count


def pivot_counts(budget: str, keep: int, image_pivots: int, pivots: int) -> list[int]:
    """Tokens each pivot chooses (in the set's order) for a row keeping ``keep`` image tokens."""
    if pivots == 0:
        return []
    if budget == "code":
        return [keep // pivots] * pivots  # TOKEN_TOPK = ceil(max_num_trunction // (pivot_image + pivot_text))
    base, extra = divmod(max(keep - image_pivots, 0), pivots)
    return [base + (n < extra) for n in range(pivots)]


def dart_keep(
    keys: Tensor, states: Tensor, image: list[int], query: list[int], pivot_image: int, pivot_text: int,
    budget: str, keep: int,
) -> list[int]:
    """The image positions DART keeps in one sample (``DART.get_retained_image_token``), ascending.

    Args: keys [L, H*hd] the layer's rotated keys (after ``repeat_kv``, flattened over heads); states [L, D] its
    output through the final norm; image / query: positions of the image tokens and of the tokens after them.
    """
    pivot_image = min(pivot_image, len(image), keep if budget == "planned" else len(image))
    image_l1 = torch.norm(keys[image], p=1, dim=-1)  # [V]
    query_l1 = torch.norm(keys[query], p=1, dim=-1)  # [T]
    image_indices = [image[i] for i in image_l1.topk(pivot_image).indices.tolist()]
    query_indices = [query[i] for i in query_l1.topk(min(pivot_text, len(query))).indices.tolist()]
    indices_set = set(image_indices + query_indices)
    valid_indices = set(image) - set(image_indices)
    valid_indices_list = list(valid_indices)
    chosen = pivot_counts(budget, keep, pivot_image, len(indices_set))
    for item, count in zip(list(indices_set), chosen):
        count = min(count, len(valid_indices_list))
        if count == 0:
            continue
        valid_vectors = states[valid_indices_list, :]
        cos_sim = -F.cosine_similarity(states[item, :], valid_vectors, dim=-1)
        top_k_real_indices = [valid_indices_list[i] for i in cos_sim.topk(count).indices.tolist()]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


def flat_repeated_keys(signals: Signals) -> Tensor:
    """[B, S, H*hd] the layer's rotated keys repeated over the query heads (``repeat_kv``), flattened per token
    as DART flattens ``key_states``."""
    keys = signals.keys(from_row_start=True)  # [B, Hkv, S, hd]
    keys = keys.repeat_interleave(signals.num_heads // signals.num_kv_heads, dim=1)  # [B, H, S, hd]
    return keys.transpose(1, 2).flatten(2)


@SCORERS.register("dart")
@dataclass
class Dart(Scorer):
    """Pivot tokens by key norm, then the image tokens least similar to each pivot (duplication-aware)."""

    pivot_image: int = 4  # --pivot_image_token
    pivot_text: int = 4  # --pivot_text_token
    budget: str = "planned"  # planned (exactly the plan's count) | code (their max_num_trunction: pivots + P*(k//P))
    _planned: list[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"dart budget {self.budget!r} unknown; choose one of {list(BUDGETS)}")
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise ValueError(f"dart pivots must be pivot_image >= 1 and pivot_text >= 0, got {self.pivot_image} "
                             f"and {self.pivot_text}")

    def keep_counts(self, signals: Signals, planned: list[int]) -> list[int]:
        """The plan's counts (``planned``), or what their code keeps for them (``code``); remembered for ``score``."""
        self._planned = list(planned)
        if self.budget == "planned":
            return planned
        counts = []
        for n, t, k in zip(signals.layout.vision_counts.tolist(), signals.text_valid.sum(1).tolist(), planned):
            image_pivots = min(self.pivot_image, n)
            pivots = image_pivots + min(self.pivot_text, t)
            counts.append(min(n, image_pivots + sum(pivot_counts("code", k, image_pivots, pivots))))
        return counts

    def score(self, signals: Signals) -> Tensor:
        layout = signals.layout
        planned, self._planned = self._planned, None
        keys, states = flat_repeated_keys(signals), signals.normed_hidden  # [B, S, H*hd], [B, S, D]
        scores = torch.zeros(layout.vision.shape, device=keys.device)  # [B, V]
        for b in range(layout.vision.shape[0]):
            slots = layout.valid[b].nonzero()[:, 0]  # the row's tokens, padding left out
            position = torch.full((layout.seq_len,), -1, dtype=torch.long, device=slots.device)
            position[slots] = torch.arange(len(slots), device=slots.device)
            count = int(layout.vision_counts[b])
            image = position[layout.vision[b, :count]].tolist()
            query = position[layout.text[b][layout.text_valid[b]]].tolist()
            keep = planned[b] if planned is not None else CODE_DEFAULT_KEEP
            kept = dart_keep(keys[b, slots], states[b, slots], image, query, self.pivot_image, self.pivot_text,
                             self.budget if planned is not None else "code", keep)
            rank = {p: i for i, p in enumerate(image)}
            scores[b, [rank[p] for p in kept]] = 1.0
        return scores
