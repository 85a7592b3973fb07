"""Budget solver: a target "average retained vision tokens" -> per-stage integer keep counts.

With pruning locations ``l_1 < ... < l_S`` and keep counts ``k_s = min(V, round(c * ratio**s))``
(stage ``s`` is 0-indexed), the average over ``L`` decoder layers is

    avg(c) = (1 / L) * sum_{layer=0}^{L-1} n(layer),

where ``n(layer)`` is the number of vision tokens at that layer. ``avg`` is non-decreasing in ``c``
and each step of it is at most one token (a step raises some ``k_s`` by one, and the layers those
stages count are at most ``L``), so bisection on ``c`` lands within half a token of any reachable
target. Two counting conventions for ``n(layer)``:

* ``"post"`` (the papers'): a pruning layer counts at its post-pruning size;
* ``"pre"`` (what ran): a pruning layer runs on its pre-pruning size, so the pruned count starts one
  layer later. This is ``PruningPlan.tokens_per_layer``.

Location ``-1`` (before the LLM) makes every layer count ``k_0`` under both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from research.pruning.plan import INTERFACE, PruningPlan

COUNTING = ("post", "pre")


def check_locations(locations: Sequence[int], num_layers: int, lowest: int = INTERFACE) -> list[int]:
    """Return ``locations`` as ints; raise a one-line ValueError unless in ``lowest .. num_layers-1``
    and strictly increasing."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    locs = [int(x) for x in locations]
    bad = [x for x in locs if not lowest <= x < num_layers]
    if bad:
        raise ValueError(
            f"pruning location(s) {bad} out of range for a {num_layers}-layer LLM; "
            f"valid: {lowest} .. {num_layers - 1}"
        )
    if locs != sorted(set(locs)):
        raise ValueError(f"pruning locations must be strictly increasing, got {locs}")
    return locs


def layer_counts(plan: PruningPlan, num_layers: int, num_vision: int, counting: str = "pre") -> list[int]:
    """Vision tokens per decoder layer under a counting convention (``"pre"`` = what ran)."""
    if counting not in COUNTING:
        raise ValueError(f"unknown counting {counting!r}; choose one of {list(COUNTING)}")
    if counting == "pre":
        return plan.tokens_per_layer(num_layers, num_vision)
    # "post": layer l counts the tokens layer l+1 runs on, i.e. the "pre" counts of one more layer, shifted.
    return plan.tokens_per_layer(num_layers + 1, num_vision)[1:]


@dataclass(frozen=True)
class Budget:
    """Solved per-stage keep counts and the averages they give.

    ``reported_avg`` uses the chosen ``counting``; ``computed_avg`` is what actually ran ("pre").
    """

    locations: tuple[int, ...]
    keep: tuple[int, ...]
    counting: str
    num_layers: int
    num_vision: int
    target: float
    reported_avg: float
    computed_avg: float

    def plan(self, positions: str = "original") -> PruningPlan:
        """The engine's plan for these locations and keep counts."""
        return PruningPlan.of(self.locations, self.keep, positions)

    def tokens_per_layer(self, counting: str = "pre") -> list[int]:
        """Vision tokens per decoder layer; ``"pre"`` (default) is what ran, ``"post"`` what papers report."""
        return layer_counts(self.plan(), self.num_layers, self.num_vision, counting)


def solve_budget(
    locations: Sequence[int],
    num_layers: int,
    num_vision: int,
    target: float,
    ratio: float = 0.5,
    counting: str = "post",
) -> Budget:
    """Per-stage keep counts whose ``counting`` average is within one token of ``target``.

    Args:
        locations: strictly increasing pruning locations in ``-1 .. num_layers-1``.
        num_layers: decoder layers of the LLM.
        num_vision: vision tokens before pruning.
        target: average retained vision tokens per layer, in ``0 .. num_vision``.
        ratio: geometric per-stage keep ratio, in ``(0, 1]``: ``k_s ~ ratio**s * k_0``.
        counting: ``"post"`` (papers' convention) or ``"pre"`` (what ran).

    Raises:
        ValueError: one line naming the bad value and the valid choices or range.
    """
    if counting not in COUNTING:
        raise ValueError(f"unknown counting {counting!r}; choose one of {list(COUNTING)}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio {ratio} out of range; valid: (0, 1]")
    if num_vision < 1:
        raise ValueError(f"num_vision must be >= 1, got {num_vision}")
    if not math.isfinite(target):
        raise ValueError(f"target {target} is not a number of tokens; valid: 0 .. {num_vision}")
    if target > num_vision:
        raise ValueError(f"target {target} exceeds the {num_vision} vision tokens")
    if target < 0:
        raise ValueError(f"target {target} out of range; valid: 0 .. {num_vision}")
    locs = tuple(check_locations(locations, num_layers))

    def budget(c: float) -> Budget:
        keep = tuple(min(num_vision, round(c * ratio**s)) for s in range(len(locs)))
        plan = PruningPlan(locs, keep)
        reported = layer_counts(plan, num_layers, num_vision, counting)
        computed = layer_counts(plan, num_layers, num_vision, "pre")
        return Budget(
            locs, keep, counting, num_layers, num_vision, target,
            sum(reported) / num_layers, sum(computed) / num_layers,
        )

    lo, hi = 0.0, num_vision / ratio ** max(len(locs) - 1, 0)  # avg(hi) = num_vision: every k_s = V
    floor = budget(lo)
    if target < floor.reported_avg:
        last_full = locs[0] - (counting == "post") if locs else num_layers - 1  # counts num_vision whatever c is
        raise ValueError(
            f"target {target} is unreachable for locations {list(locs)} in a {num_layers}-layer LLM: "
            f"the minimum average is {floor.reported_avg:g} under {counting!r} counting (layers 0 .. "
            f"{last_full} keep all {num_vision} vision tokens)"
        )
    for _ in range(100):
        mid = (lo + hi) / 2
        if budget(mid).reported_avg < target:
            lo = mid
        else:
            hi = mid
    best = min((budget(lo), budget(hi)), key=lambda b: abs(b.reported_avg - target))
    if best.keep and best.keep[0] == 0:
        raise ValueError(
            f"target {target} keeps 0 vision tokens from location {best.locations[0]} on: the model would never "
            f"see the image; valid: a target that keeps at least 1 token at the first stage"
        )
    return best
