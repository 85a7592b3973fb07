"""The schedule contract and registry: where in the LLM to prune, and how keep counts shrink per stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from research.registry import Registry
from schedules.budget import Budget, check_locations, solve_budget


@dataclass(kw_only=True)
class Schedule:
    """Pruning locations: ``locations(num_layers) -> list[int]``, sorted, distinct, 0-indexed.

    Location ``l`` prunes after decoder layer ``l``; layers ``l+1 ...`` run on the kept tokens.
    Subclasses are dataclasses whose fields are their parameters, registered with
    ``@SCHEDULES.register("name")``; they implement ``propose`` and ``locations`` validates it.
    Only schedules with ``allows_interface`` may return ``-1`` (prune before the LLM).

    ``ratio`` is the geometric per-stage keep ratio the budget solver uses: stage ``s`` keeps about
    ``ratio**s`` times stage 0's count.
    """

    registry_name: ClassVar[str]
    allows_interface: ClassVar[bool] = False
    solves_any_target: ClassVar[bool] = True  # False: only the budgets a method's code lists (``listed``)

    ratio: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio {self.ratio} out of range; valid: (0, 1]")

    def propose(self, num_layers: int) -> list[int]:
        """Unvalidated pruning locations for a ``num_layers``-layer LLM."""
        raise NotImplementedError

    def locations(self, num_layers: int) -> list[int]:
        """Validated pruning locations; raises a one-line ValueError naming the bad value and range."""
        locs = self.propose(num_layers)
        if not locs:
            raise ValueError(f"schedule {self!r} gave no pruning locations for {num_layers} layers")
        return check_locations(locs, num_layers, lowest=-1 if self.allows_interface else 0)

    def solve(self, num_layers: int, num_vision: int, target: float, counting: str = "post") -> Budget:
        """Keep counts at ``locations(num_layers)`` averaging ``target`` vision tokens per layer."""
        return solve_budget(self.locations(num_layers), num_layers, num_vision, target, self.ratio, counting)


SCHEDULES: Registry[type[Schedule]] = Registry("schedule")
