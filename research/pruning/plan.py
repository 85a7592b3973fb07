"""What the engine does in one forward: where to prune and how many vision tokens to keep."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

POSITION_MODES = ("original", "compact")
INTERFACE = -1  # location of pruning at the vision-language interface, before decoder layer 0


@dataclass(frozen=True)
class PruningPlan:
    """Per-stage pruning locations and keep counts.

    Location ``l >= 0`` prunes after decoder layer ``l`` (0-indexed) using that layer's attention;
    layers ``l+1 ...`` run on the kept tokens. Location ``-1`` prunes at the vision-language
    interface, before the LLM. ``keep[i]`` vision tokens remain after stage ``i``.

    ``positions="original"`` keeps each kept token's rotary position; ``"compact"`` renumbers the
    kept tokens consecutively (an ablation).
    """

    locations: tuple[int, ...]
    keep: tuple[int, ...]
    positions: str = "original"

    def __post_init__(self) -> None:
        object.__setattr__(self, "locations", tuple(int(x) for x in self.locations))
        object.__setattr__(self, "keep", tuple(int(x) for x in self.keep))
        if len(self.locations) != len(self.keep):
            raise ValueError(f"{len(self.locations)} locations but {len(self.keep)} keep counts")
        if list(self.locations) != sorted(set(self.locations)):
            raise ValueError(f"locations must be strictly increasing, got {list(self.locations)}")
        if self.locations and self.locations[0] < INTERFACE:
            raise ValueError(f"locations must be >= {INTERFACE} (-1 = before the LLM), got {list(self.locations)}")
        if any(k < 0 for k in self.keep) or list(self.keep) != sorted(self.keep, reverse=True):
            raise ValueError(f"keep counts must be non-negative and non-increasing, got {list(self.keep)}")
        if self.positions not in POSITION_MODES:
            raise ValueError(f"unknown positions {self.positions!r}; choose one of {list(POSITION_MODES)}")

    @classmethod
    def of(cls, locations: Sequence[int], keep: Sequence[int], positions: str = "original") -> PruningPlan:
        return cls(tuple(locations), tuple(keep), positions)

    def check(self, num_layers: int, num_vision: int | None = None) -> None:
        """Raise a one-line error if the plan does not fit a model."""
        bad = [x for x in self.locations if x >= num_layers]
        if bad:
            raise ValueError(
                f"pruning location(s) {bad} out of range for a {num_layers}-layer LLM; valid: -1 .. {num_layers - 1}"
            )
        if num_vision is not None and self.keep and self.keep[0] > num_vision:
            raise ValueError(f"keep count {self.keep[0]} exceeds the {num_vision} vision tokens")

    def tokens_per_layer(self, num_layers: int, num_vision: int) -> list[int]:
        """Vision tokens each decoder layer actually runs on (what the engine computes)."""
        counts = []
        for layer in range(num_layers):
            kept = [k for loc, k in zip(self.locations, self.keep) if loc < layer]
            counts.append(min([num_vision, *kept]))
        return counts
