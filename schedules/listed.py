"""A method's own published keep counts per stage, one list per budget (SparseVLM's ``score.py`` lists)."""

from __future__ import annotations

from dataclasses import dataclass, field

from research.pruning.plan import PruningPlan
from schedules.base import SCHEDULES
from schedules.budget import Budget, check_locations, layer_counts
from schedules.layers import Layers


@SCHEDULES.register("listed")
@dataclass
class Listed(Layers):
    """Prunes after ``layers`` (as ``layers`` reads them: ``scale_from``, ``prune_before``) and keeps the counts a
    method's code lists for a budget, instead of the solver's geometric ones.

    ``counts`` maps a budget, in tokens of ``reference_tokens`` image tokens (LLaVA-1.5's 576), to a keep count per
    stage; on a model with ``n`` image tokens a budget ``b`` looks up ``b * reference_tokens / n`` and keeps each count
    times ``n / reference_tokens`` (rounded). A budget without a list is refused in one line naming those listed.

    The lists are the method's for the depth it was run at: there they are kept as listed (their average is
    whatever they give, e.g. SparseVLM's 192 -> 192.03). At another depth (the layers rescaled by
    ``scale_from``) the same counts would average another budget, so when they miss the target by more than a
    token they are scaled together, keeping the method's stage proportions, to the count the solver would
    reach (bisection, as ``solve_budget``).
    """

    solves_any_target = False

    counts: dict[int, list[int]] = field(default_factory=dict)
    reference_tokens: int = 576

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.counts:
            raise ValueError("listed needs counts: {budget: [keep per stage], ...} (e.g. {192: [309, 204, 113]})")
        self.counts = {int(budget): [int(k) for k in keep] for budget, keep in self.counts.items()}
        lengths = {len(keep) for keep in self.counts.values()}
        if lengths != {len(self.layers)}:
            raise ValueError(f"listed counts must give one count per layer of {list(self.layers)}; got lists of "
                             f"{sorted(lengths)}")

    def solve(self, num_layers: int, num_vision: int, target: float, counting: str = "post") -> Budget:
        locations = check_locations(self.locations(num_layers), num_layers)
        key = round(target * self.reference_tokens / num_vision)
        if key not in self.counts or abs(key * num_vision / self.reference_tokens - target) > 0.5:
            listed = [b * num_vision / self.reference_tokens for b in sorted(self.counts)]
            raise ValueError(f"listed counts cover budgets {[f'{b:g}' for b in listed]} of {num_vision} image tokens "
                             f"({sorted(self.counts)} of {self.reference_tokens}); got {target:g}")
        listed = [k * num_vision / self.reference_tokens for k in self.counts[key]]

        def budget(scale: float) -> Budget:
            keep = tuple(min(num_vision, max(1, round(scale * k))) for k in listed)
            plan = PruningPlan(tuple(locations), keep)
            reported = layer_counts(plan, num_layers, num_vision, counting)
            computed = layer_counts(plan, num_layers, num_vision, "pre")
            return Budget(tuple(locations), keep, counting, num_layers, num_vision, target,
                          sum(reported) / num_layers, sum(computed) / num_layers)

        as_listed = budget(1.0)
        if abs(as_listed.reported_avg - target) <= 1:
            return as_listed
        lo, hi = 0.0, num_vision / min(listed)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if budget(mid).reported_avg < target else (lo, mid)
        best = min((budget(lo), budget(hi)), key=lambda b: abs(b.reported_avg - target))
        if abs(best.reported_avg - target) > 1:
            raise ValueError(f"listed counts {self.counts[key]} cannot be scaled to average {target:g} tokens at "
                             f"locations {locations} of a {num_layers}-layer LLM (closest: {best.reported_avg:g})")
        return best
