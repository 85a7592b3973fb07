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

    Rows may hold different numbers of image tokens ``n``. With ``relative=False`` a row keeps
    ``min(keep[i], tokens it has left)`` (the papers' absolute counts); with ``relative=True`` each
    ``keep[i]`` is a fraction and a row keeps ``round(keep[i] * n)`` of its own tokens.
    """

    locations: tuple[int, ...]
    keep: tuple[float, ...]
    positions: str = "original"
    relative: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "locations", tuple(int(x) for x in self.locations))
        object.__setattr__(self, "keep", tuple(float(x) if self.relative else int(x) for x in self.keep))
        if self.relative and any(not 0 <= k <= 1 for k in self.keep):
            raise ValueError(f"relative keep fractions must lie in [0, 1], got {list(self.keep)}")
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
    def of(cls, locations: Sequence[int], keep: Sequence[float], positions: str = "original",
           relative: bool = False) -> PruningPlan:
        return cls(tuple(locations), tuple(keep), positions, relative)

    def check(self, num_layers: int, num_vision: int | None = None) -> None:
        """Raise a one-line error if the plan does not fit a model (``num_vision``: its fixed image-token count)."""
        bad = [x for x in self.locations if x >= num_layers]
        if bad:
            raise ValueError(
                f"pruning location(s) {bad} out of range for a {num_layers}-layer LLM; valid: -1 .. {num_layers - 1}"
            )
        if num_vision is not None and not self.relative and self.keep and self.keep[0] > num_vision:
            raise ValueError(f"keep count {self.keep[0]} exceeds the {num_vision} vision tokens")

    def stage_keep(self, stage: int, num_vision: int) -> int:
        """Tokens a row of ``num_vision`` image tokens keeps after ``stage`` (fractions round half to even)."""
        if self.relative:
            return round(self.keep[stage] * num_vision)
        return min(int(self.keep[stage]), num_vision)

    def tokens_per_layer(self, num_layers: int, num_vision: int) -> list[int]:
        """Vision tokens each decoder layer runs on, for a row of ``num_vision`` image tokens."""
        counts = []
        for layer in range(num_layers):
            stages = [i for i, loc in enumerate(self.locations) if loc < layer]
            counts.append(self.stage_keep(stages[-1], num_vision) if stages else num_vision)
        return counts
