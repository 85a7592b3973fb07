"""Random baseline: seeded uniform scores, one draw per sample, the same whatever else is in the batch."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from research.pruning.signals import Signals
from scorers.base import SCORERS, Scorer


@SCORERS.register("random")
@dataclass
class RandomScorer(Scorer):
    """Keeps a uniformly random subset of vision tokens; works at any location, -1 included.

    Each row draws from its own generator, seeded by ``seed``, the stage and a checksum of the row's prompt
    (its ``input_ids`` without padding), and scores each token by its place among its image's tokens
    (``vision_rank``). So a row keeps the same tokens in any batch as alone (a shared [B, V] draw would give
    row i the i-th slice of it), and samples with different prompts get independent draws: the baseline
    averages over many random subsets, not over one shared by every sample.
    """

    needs_llm_attention = False

    seed: int = 0

    def score(self, signals: Signals) -> Tensor:
        rank = signals.layout.vision_rank  # [B, V] each token's index among its image's tokens
        size = signals.interface.layout.vision.shape[1]  # the batch's most image tokens: above every rank
        # CPU generators keep 32 bits of a seed: seed, stage and prompt are chained into one CRC-32
        stage_key = zlib.crc32(f"random/{self.seed}/{signals.stage}".encode())
        draws = []
        for prompt in self._prompts(signals):
            generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(prompt, stage_key))
            # a longer CPU draw starts with the shorter one: the batch's size changes no row's scores
            draws.append(torch.rand(size, generator=generator))  # [R] one score per rank
        table = torch.stack(draws).to(rank.device)  # [B, R]
        return table.gather(1, rank)  # [B, V]

    @staticmethod
    def _prompts(signals: Signals) -> list[bytes]:
        """Each row's unpadded ``input_ids`` as bytes, read from the device once per forward (every stage's)."""
        if "random/prompts" not in signals.memo:
            ids, valid = signals.interface.input_ids.cpu(), signals.interface.layout.valid.cpu()  # [B, S0]
            signals.memo["random/prompts"] = [row[keep].numpy().tobytes() for row, keep in zip(ids, valid)]
        return signals.memo["random/prompts"]
