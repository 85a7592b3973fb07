"""SparseVLM v1 (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient VLM Inference", ICML 2025).

Reference followed: the authors' repository Gumpest/SparseVLMs on LLaVA-1.5, ``llava/model/language_model/``
(``modelling_sparse_llama.py``: ``LlamaDynamicvitModel.forward``; ``score.py``; ``utils.py``: ``cluster_and_merge``).

1. Raters (their Sec. 3.2), once per forward from the LLM's input embeddings: with ``H_v`` the image tokens and
   ``H_t`` every token after the image, ``r = mean_v softmax_t(H_v H_t^T)`` (no 1/sqrt(D)); the raters are the
   tokens with ``r_t > mean_t r`` (strict).
2. At each of its layers, the layer's own attention, averaged over heads: ``R = A[raters, vision]`` [n_r, V];
   a vision token's score is the mean of its column over the raters.
3. How many to keep, two readings of "v1" in the repository's history (``variant``):

   * ``"main"`` (default): main's default (``USE_VERSION=1_0``, ``score.py``): layers 2, 6, 15 of 32, fixed
     lists ``keep = min(list[stage], V - 1)`` chosen by ``RETAIN_TOKN`` (``retain``): 192 -> 300, 200, 110;
     128 -> 303, 110, 36; 96 -> 238, 48, 26; 64 -> 66, 30, 17;
   * ``"v1"``: the first release (commit 91fb6d9, ``attn_postprocess_rank``): layers 2, 6, 15, 19 of 32; with
     ``rank = matrix_rank(R)``, nothing is pruned if ``rank == V``, else ``keep = min(int(rank * scale + bias),
     V - 1)``; ``scale, bias`` from its scripts (``retain``): 192 -> 13.5, 0; 128 -> 9, 6; 64 -> 0.8, 0.

   The default is ``"main"``: it is what the repository runs today, its counts give the published 192 / 128 / 64
   average tokens for every sample (the rank reading's average depends on the question: its scale and bias were
   tuned per benchmark script), and it is deterministic in the count.
4. Recycling (their Sec. 3.3): of the tokens dropped at a layer, the top 30% by score (``int(0.3 n) + 1``) are
   clustered by density-peaks kNN (``cluster_and_merge``: ``int(m / 10) + 1`` clusters on the layer's output
   states) and each cluster becomes one token (the engine's merge: the mean of its members). Merged tokens are
   vision tokens for the next layers (counted in V, scored, dropped, recycled again). The average-token figures
   count them: 300, 200, 110 run as 309, 204, 113 tokens, 192.0 on average over 32 layers.

``retain=None``: the plan's count is the number of tokens a layer runs on (kept plus merged): ``"main"`` keeps
the largest ``k`` with ``k + clusters(V - k) <= count`` (their lists are recovered from 309, 204, 113);
``"v1"`` uses ``scale`` and ``bias`` (default 13.5, 0: its defaults). On a model whose image has ``n != 576``
tokens the repository's counts are scaled by ``n / 576`` (layers: the schedule's ``scale_from: 32``).

Differences from their code:

* where a merged token sits: theirs appends the merged tokens after the kept image tokens; here each sits in
  the slot of its last member (``research.pruning.engine``): the same tokens, the image span in another order;
  with ``positions=compact`` (their code renumbers positions after every drop, in prefill and decode, which the
  protocol needs: ``needs_compact_positions``) the text after the image gets the same positions as theirs;
* the merged token is the plain mean of its members; theirs divides the sum by ``count + 1e-6``;
* the density noise of ``cluster_and_merge`` (``rand * 1e-6``) is drawn from a generator seeded with ``seed``
  for every clustering, so a row's result does not depend on the batch or the call order; theirs uses the
  global RNG;
* raters, the clustering distances and the rank are computed in float32 (theirs: raters and distances in the
  model's dtype); the attention is averaged over heads in ``dtype`` (``"model"``: cast like theirs);
* their code handles one unpadded sample (batch size 1); here rows of a left-padded batch are scored,
  counted (rank of each row's own matrix) and recycled independently, padding masked out;
* ``matrix_rank`` of the raters' rows uses torch's default tolerance, as theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer, SoftmaxDtypeOption

REFERENCE_TOKENS = 576  # LLaVA-1.5's image tokens, which the repository's counts are of
VARIANTS = {"main": [2, 6, 15], "v1": [2, 6, 15, 19]}  # their pruning layers of LLaVA-1.5-7B's 32
FIXED_COUNTS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}  # score.py, main
RANK_SCALE_BIAS = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}  # first release, README and scripts
RECYCLE_SHARE = 0.3  # top 30% of the dropped tokens are recycled
CLUSTER_EVERY = 10  # one cluster per 10 recycled tokens (plus one)


def select_raters(text_embeds: Tensor, vision_embeds: Tensor, text_valid: Tensor, vision_valid: Tensor) -> Tensor:
    """[B, T] bool: tokens after the image whose relevance ``mean_v softmax_t(H_v H_t^T)`` is above the mean."""
    logits = vision_embeds.float() @ text_embeds.float().transpose(1, 2)  # [B, V, T]
    probs = torch.softmax(logits.masked_fill(~text_valid[:, None, :], float("-inf")), dim=-1)
    relevance = (probs * vision_valid[:, :, None]).sum(1) / vision_valid.sum(1, keepdim=True).clamp(min=1)  # [B, T]
    mean = (relevance * text_valid).sum(1, keepdim=True) / text_valid.sum(1, keepdim=True).clamp(min=1)
    return (relevance > mean) & text_valid


def recycled_count(dropped: int) -> tuple[int, int]:
    """(tokens recycled, clusters they merge into) of ``dropped`` dropped tokens, as their code counts them."""
    if dropped == 0:
        return 0, 0
    recycled = int(dropped * RECYCLE_SHARE) + 1
    return recycled, int(recycled / CLUSTER_EVERY) + 1


def density_peak_clusters(x: Tensor, num_clusters: int, noise: Tensor) -> Tensor:
    """[N] cluster of each of ``x`` [N, C] (0 .. num_clusters - 1, in the order of the centres' scores):
    ``cluster_and_merge``'s DPC-kNN assignment, ``noise`` [N] its ``rand * 1e-6`` density tie-break."""
    dist = torch.cdist(x[None].float(), x[None].float(), compute_mode="donot_use_mm_for_euclid_dist")[0]
    dist = dist / x.shape[-1] ** 0.5  # [N, N]
    nearest = dist.topk(num_clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp() + noise
    denser = (density[None, :] > density[:, None]).float()  # [i, j]: j is denser than i
    parent_dist = (dist * denser + dist.max() * (1 - denser)).min(-1).values
    centres = (parent_dist * density).topk(num_clusters).indices  # [c]
    labels = dist[centres].argmin(0)  # [N] nearest centre
    labels[centres] = torch.arange(num_clusters, device=x.device)
    return labels


@SCORERS.register("sparsevlm")
@dataclass
class SparseVLM(Scorer, SoftmaxDtypeOption):
    """Raters' mean attention to each vision token; rank-adaptive or listed counts; dropped tokens recycled."""

    needs_compact_positions: ClassVar[bool] = True  # its protocol renumbers positions: 1-D rotary positions only

    variant: str = "main"  # main (layers 2, 6, 15, fixed lists) | v1 (layers 2, 6, 15, 19, rank-adaptive)
    retain: int | None = None  # their RETAIN_TOKN: 192 | 128 | 96 | 64 (main), 192 | 128 | 64 (v1); None = the plan
    scale: float = 13.5  # v1 with retain=None: keep = int(rank * scale + bias)
    bias: float = 0.0
    recycle: bool = True  # merge the top dropped tokens into a few (their Sec. 3.3)
    seed: int = 0  # the clustering's density tie-break noise

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"sparsevlm variant {self.variant!r} unknown; choose one of {sorted(VARIANTS)}")
        table = FIXED_COUNTS if self.variant == "main" else RANK_SCALE_BIAS
        if self.retain is not None and self.retain not in table:
            raise ValueError(f"sparsevlm retain {self.retain!r} has no {self.variant!r} counts in the repository; "
                             f"choose one of {sorted(table)} or None (the plan's counts)")
        super().__post_init__()

    @property
    def layers(self) -> list[int]:
        """The variant's pruning layers of a 32-layer LLaMA (a schedule ``{name: layers, scale_from: 32}``)."""
        return list(VARIANTS[self.variant])

    # ---- the relation matrix of one layer, computed once and shared by counts, scores and recycling -----
    def _raters(self, signals: Signals) -> Tensor:
        raters = signals.memo.get("sparsevlm.raters")
        if raters is None:
            interface = signals.interface
            raters = select_raters(interface.text_embeds, interface.vision_embeds, signals.text_valid,
                                   interface.layout.vision_valid)
            signals.memo["sparsevlm.raters"] = raters
        return raters

    def _relation(self, signals: Signals) -> tuple[Tensor, Tensor]:
        """(raters [B, T] bool, head-mean attention [B, T, V] of every text row; invalid entries 0)."""
        key = ("sparsevlm.relation", signals.layer_idx)
        if key not in signals.memo:
            attention = signals.attention("text", self.head_mean_dtype(signals))  # [B, T, S]
            t2v = attention.gather(2, signals.layout.vision[:, None, :].expand(-1, attention.shape[1], -1))
            t2v = t2v * signals.vision_valid[:, None, :]
            signals.memo[key] = (self._raters(signals), t2v)
        return signals.memo[key]

    def _rater_rows(self, signals: Signals, row: int) -> Tensor:
        """[n_r, V_row] the raters' attention rows of ``row`` over its own vision tokens."""
        raters, t2v = self._relation(signals)
        return t2v[row][raters[row]][:, : int(signals.vision_valid[row].sum())]

    def score(self, signals: Signals) -> Tensor:
        raters, t2v = self._relation(signals)
        weights = raters.to(t2v.dtype) / raters.sum(1, keepdim=True).clamp(min=1).to(t2v.dtype)  # [B, T]
        return torch.einsum("bt,btv->bv", weights, t2v).float()  # [B, V]

    # ---- engine hooks: counts and recycling ----------------------------------------------------------------
    def keep_counts(self, signals: Signals, planned: list[int]) -> list[int]:
        """Each row's vision tokens kept at this stage (before recycling adds its merged tokens)."""
        remaining = signals.vision_valid.sum(1).tolist()
        images = signals.interface.layout.vision_counts.tolist()
        return [self._row_keep(signals, b, v, n / REFERENCE_TOKENS, p)
                for b, (v, n, p) in enumerate(zip(remaining, images, planned))]

    def _row_keep(self, signals: Signals, row: int, remaining: int, factor: float, planned: int) -> int:
        if remaining == 0:
            return 0
        if self.variant == "v1":
            rank = int(torch.linalg.matrix_rank(self._rater_rows(signals, row).float()))
            if rank == remaining:
                return remaining  # full rank: this layer needs no sparsification
            scale, bias = RANK_SCALE_BIAS[self.retain] if self.retain is not None else (self.scale, self.bias)
            return min(int(int(rank * scale + bias) * factor), remaining - 1)
        if self.retain is not None:
            counts = FIXED_COUNTS[self.retain]
            if signals.stage >= len(counts):
                raise ValueError(f"sparsevlm retain={self.retain} lists {len(counts)} stages (layers "
                                 f"{VARIANTS['main']} of 32); the plan has a stage {signals.stage}")
            return min(round(counts[signals.stage] * factor), remaining - 1)
        return self._keep_for_total(remaining, planned)

    def _keep_for_total(self, remaining: int, total: int) -> int:
        """The most tokens to keep so that they and the merged ones are at most ``total``."""
        if total >= remaining or not self.recycle:
            return min(total, remaining)
        keep = total
        while keep > 0 and keep + recycled_count(remaining - keep)[1] > total:
            keep -= 1
        return keep

    def merge_groups(self, signals: Signals, vision_hidden: Tensor, is_kept: Tensor) -> Tensor | None:
        """[B, V] cluster of each recycled token (-1: kept, or dropped for good)."""
        if not self.recycle:
            return None
        scores = self.score(signals)  # memoized relation: the scores the tokens were ranked by
        groups = torch.full_like(is_kept, -1, dtype=torch.long)
        dropped = signals.vision_valid & ~is_kept
        for row in range(is_kept.shape[0]):
            candidates = dropped[row].nonzero().squeeze(1)  # ascending
            recycled, clusters = recycled_count(len(candidates))
            if recycled == 0:
                continue
            members = candidates[scores[row, candidates].topk(recycled).indices]
            noise = torch.rand(recycled, generator=torch.Generator().manual_seed(self.seed)) * 1e-6
            labels = density_peak_clusters(vision_hidden[row, members], clusters, noise.to(vision_hidden.device))
            groups[row, members] = labels
        return groups
