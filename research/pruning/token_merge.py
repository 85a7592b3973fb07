"""Token merging maths (ToMe: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023), free of hooks.

The step, as facebookresearch/ToMe's ``tome/merge.py`` computes it: split the tokens alternately into sets
A (even slots) and B (odd slots); join each A token to its most similar B token (cosine of the ``metric``,
the keys averaged over heads); merge the ``r`` A tokens with the most similar partners into them. A
protected CLS token (slot 0) is never merged and stays first. The result is ``[unmerged A (ascending), B]``.

:func:`merge_wavg` averages merged tokens weighted by their sizes (patches per token), :func:`merge_source`
tracks which input patches each token holds. The ``r``-per-layer schedules and the solver that turns a
target token count into them live here too; the hooks that run this inside a vision tower are in
``research.pruning.vision_merge``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

R_READINGS = ("tome", "lightcompress")


@dataclass(frozen=True)
class Merge:
    """One bipartite soft matching of ``[B, T, C]`` tokens: ``merge(x, mode)`` -> ``[B, T - r, C]``."""

    unmerged: Tensor  # [B, |A| - r, 1] indices into A of the A tokens that stay
    src: Tensor  # [B, r, 1] indices into A of the tokens merged away
    dst: Tensor  # [B, r, 1] indices into B of the token each one joins

    @property
    def r(self) -> int:
        return self.src.shape[1]

    def __call__(self, x: Tensor, mode: str = "mean") -> Tensor:
        a, b = x[..., ::2, :], x[..., 1::2, :]
        batch, _, width = a.shape
        kept = a.gather(-2, self.unmerged.expand(batch, -1, width))
        moved = a.gather(-2, self.src.expand(batch, self.r, width))
        b = b.scatter_reduce(-2, self.dst.expand(batch, self.r, width), moved, reduce=mode)
        return torch.cat([kept, b], dim=1)


def bipartite_soft_matching(metric: Tensor, r: int, class_token: bool = False) -> Merge | None:
    """The merge of ``r`` tokens chosen by ``metric`` [B, T, C] (None: nothing to merge).

    ``r`` is capped at half the unprotected tokens, as in ToMe (a callers' schedule should not rely on it:
    :func:`tokens_after` applies the same cap)."""
    r = min(r, (metric.shape[1] - int(class_token)) // 2)
    if r <= 0:
        return None
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)  # [B, |A|, |B|]
        if class_token:
            scores[..., 0, :] = -torch.inf
        best, partner = scores.max(dim=-1)  # [B, |A|]
        order = best.argsort(dim=-1, descending=True)[..., None]  # [B, |A|, 1]
        unmerged, src = order[..., r:, :], order[..., :r, :]
        dst = partner[..., None].gather(-2, src)
        if class_token:
            unmerged = unmerged.sort(dim=1).values  # CLS stays first
    return Merge(unmerged, src, dst)


def merge_wavg(merge: Merge, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge of ``x`` [B, T, C]; returns it and the new sizes [B, T - r, 1]."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Merge, x: Tensor, source: Tensor | None = None) -> Tensor:
    """[B, T - r, N] 0/1 map from each merged token to the N input tokens it holds (identity to start)."""
    if source is None:
        batch, tokens, _ = x.shape
        source = torch.eye(tokens, device=x.device, dtype=x.dtype)[None].expand(batch, tokens, tokens)
    return merge(source, mode="amax")


# ---- r per layer ---------------------------------------------------------------------------------------------
def parse_r(num_layers: int, r: int | Sequence, reading: str = "tome") -> list[int]:
    """An ``r`` setting as a list of ``num_layers`` merges per layer.

    An int is constant; a list gives each layer's (missing layers: 0). A 2-tuple means different things in
    the two codebases: facebookresearch/ToMe's ``parse_r`` reads ``(r, inflection)`` (from ``r * (1 -
    inflection)`` to ``r * (1 + inflection)`` linearly, truncated; ``(r, -1)`` is the paper's decreasing
    schedule); LightCompress's ``ToMe.add_sparse_config`` reads ``(start, step)`` (``start + i * step``,
    at least 0)."""
    if reading not in R_READINGS:
        raise ValueError(f"r reading {reading!r} unknown; choose one of {list(R_READINGS)}")
    if isinstance(r, list):
        return [max(int(x), 0) for x in r[:num_layers]] + [0] * max(num_layers - len(r), 0)
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"a tuple r is a pair ((r, inflection) or (start, step)), got {r}")
        first, second = r
        if reading == "lightcompress":
            return [max(int(first + i * second), 0) for i in range(num_layers)]
        low = int(first * (1.0 - second))
        step = (2 * first - 2 * low) / max(num_layers - 1, 1)
        return [int(low + step * i) for i in range(num_layers)]
    if isinstance(r, (int, float)):
        return [max(int(r), 0)] * num_layers
    raise ValueError(f"r must be an int, a 2-tuple or a list of ints, got {r!r}")


def tokens_after(tokens: int, schedule: Sequence[int], protected: int) -> list[int]:
    """Tokens after each layer of ``schedule``, from ``tokens`` (ToMe's cap: at most half the unprotected)."""
    counts = []
    for r in schedule:
        tokens -= max(min(r, (tokens - protected) // 2), 0)
        counts.append(tokens)
    return counts


def constant_schedule(merges: int, num_layers: int) -> list[int]:
    """``merges`` spread over ``num_layers`` as ToMe's constant ``r``: ``merges // num_layers`` in every layer,
    the remainder one more in each of the last layers (the tower then ends at the requested count)."""
    base, extra = divmod(merges, num_layers)
    return [base + (i >= num_layers - extra) for i in range(num_layers)]


def solve_r(tokens: int, keep: int, num_layers: int, protected: int) -> list[int]:
    """Merges per layer that take ``tokens`` (protected ones included) to exactly ``keep + protected`` over
    ``num_layers`` merging layers: ToMe's constant ``r`` (:func:`constant_schedule`) when its cap of half the
    tokens per layer allows it, else as many as the cap allows from the first layer on (a decreasing schedule);
    a one-line ValueError names the fewest tokens reachable otherwise."""
    if num_layers < 1:
        raise ValueError("the vision tower has no layer before its feature layer to merge in")
    if not 0 <= keep <= tokens - protected:
        raise ValueError(f"cannot merge {tokens - protected} tokens into {keep}")
    schedule = constant_schedule(tokens - protected - keep, num_layers)
    if tokens_after(tokens, schedule, protected)[-1] == keep + protected:
        return schedule
    schedule, left = [], tokens
    for _ in range(num_layers):
        r = min((left - protected) // 2, left - protected - keep)
        schedule.append(r)
        left -= r
    if left != keep + protected:
        raise ValueError(f"ToMe merges at most half the tokens per layer: {num_layers} merging layer(s) take "
                         f"{tokens - protected} tokens to no fewer than {left - protected}, not {keep}")
    return schedule
