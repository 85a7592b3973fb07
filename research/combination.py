"""A combination of a sweep: one scorer with its parameters, one schedule, one budget (vanilla: none), solved to
its pruning plan, and what the summary needs to name it (its label, its reference, an identical plan)."""

from __future__ import annotations

from dataclasses import dataclass, field

from research.pruning import PruningPlan
from research.specs import build, label, slug
from scorers import SCORERS


@dataclass
class Combination:
    scorer: str
    schedule: str  # label, e.g. layers[1-10-20]
    budget: float | None  # average retained vision tokens (a fraction of them if < 1); None = vanilla
    locations: list[int] = field(default_factory=list)
    keep: list[float] = field(default_factory=list)  # per stage: tokens, or fractions of a row's (relative)
    reported_avg: float = 0.0  # under the configured counting convention
    computed_avg: float = 0.0  # what actually ran
    scorer_params: dict = field(default_factory=dict)
    schedule_params: dict = field(default_factory=dict)
    error: str = ""  # why it cannot run (a calibrated schedule that cannot reach the budget); "" = runnable
    positions: str = "original"  # the plan's positions: the experiment's, or the scorer entry's own
    own_positions: bool = False  # positions came from the scorer entry (and are part of the name)
    schedule_name: str = ""  # registry name of the schedule ("" for vanilla and interface scorers)
    relative: bool = False  # keep holds fractions of each row's image tokens (a budget < 1)
    reference: str = ""  # name of the combination it is tested against besides vanilla ("" for none)
    same_plan_as: str = ""  # name of an earlier combination that runs the identical plan ("" for none)
    label: str = ""  # the short label users see everywhere (research.report.labels), set by plan_sweep

    @property
    def is_vanilla(self) -> bool:
        return self.budget is None

    @property
    def name(self) -> str:
        if self.is_vanilla:
            return "vanilla"
        return slug(f"{self.scorer_label}__{self.schedule}__b{self.budget:g}{self.positions_suffix}")

    @property
    def positions_suffix(self) -> str:
        """``__<positions>`` when the scorer entry chose its own positions (part of names), else ""."""
        return f"__{self.positions}" if self.own_positions else ""

    @property
    def scorer_label(self) -> str:
        """The scorer with its parameters: ``fastv(query="all")``."""
        return label(self.scorer, self.scorer_params)

    def plan(self, positions: str | None = None) -> PruningPlan:
        """The engine's plan; ``positions`` defaults to the combination's own."""
        return PruningPlan.of(self.locations, self.keep, positions or self.positions, relative=self.relative)

    def make_scorer(self):
        return build(SCORERS, self.scorer, self.scorer_params)
