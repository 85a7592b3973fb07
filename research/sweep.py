"""The combinations of an experiment: vanilla, then every scorer x schedule x budget (solved to keep counts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from research.config import ConfigError, RunConfig, entry, label, slug
from research.pruning import PruningPlan
from schedules import SCHEDULES, solve_budget
from scorers import SCORERS

INTERFACE_SCHEDULE = "interface"  # pre-LLM scorers prune once, before the LLM, whatever the schedules


@dataclass
class Combination:
    scorer: str
    schedule: str
    budget: float | None  # average retained vision tokens; None = vanilla
    locations: list[int] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)
    reported_avg: float = 0.0  # under the configured counting convention
    computed_avg: float = 0.0  # what actually ran
    scorer_params: dict = field(default_factory=dict)
    schedule_params: dict = field(default_factory=dict)

    @property
    def is_vanilla(self) -> bool:
        return self.budget is None

    @property
    def name(self) -> str:
        if self.is_vanilla:
            return "vanilla"
        return slug(f"{label(self.scorer, self.scorer_params)}__{self.schedule}__b{self.budget:g}")

    def plan(self, positions: str) -> PruningPlan:
        return PruningPlan.of(self.locations, self.keep, positions)

    def make_scorer(self):
        return SCORERS.get(self.scorer)(**self.scorer_params)


def plan_sweep(cfg: RunConfig, num_layers: int, num_vision: int) -> list[Combination]:
    """Every combination, budgets solved; impossible budgets and bad locations raise ConfigError."""
    full = float(num_vision)
    combos = [Combination("vanilla", "-", None, [], [], full, full)]
    for scorer_spec in cfg.scorers:
        scorer, scorer_params = entry(scorer_spec)
        pre_llm = SCORERS.get(scorer).pre_llm
        schedules = [(INTERFACE_SCHEDULE, {}, None)] if pre_llm else [
            (label(*entry(spec)), entry(spec)[1], SCHEDULES.get(entry(spec)[0])(**entry(spec)[1]))
            for spec in cfg.schedules
        ]
        for schedule_label, schedule_params, schedule in schedules:
            for budget in cfg.budgets:
                try:
                    if schedule is None:
                        solved = solve_budget([-1], num_layers, num_vision, budget, counting=cfg.counting)
                    else:
                        solved = schedule.solve(num_layers, num_vision, budget, counting=cfg.counting)
                except ValueError as error:
                    raise ConfigError(f"{scorer} x {schedule_label} at budget {budget:g}: {error}") from None
                combos.append(Combination(
                    scorer, schedule_label, float(budget), list(solved.locations), list(solved.keep),
                    solved.reported_avg, solved.computed_avg, scorer_params, schedule_params,
                ))
    names = [c.name for c in combos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the sweep lists the same combination twice: {duplicates}")
    return combos
