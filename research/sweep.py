"""The combinations of an experiment: vanilla, then every scorer x schedule x budget (solved to keep counts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from research.experiment import Experiment
from research.pruning import PruningPlan
from research.report.labels import combination_labels
from research.specs import ConfigError, ScheduleSpec, build, label, slug
from schedules import solve_budget
from scorers import SCORERS

INTERFACE_SCHEDULE = "interface"  # pre-LLM scorers prune once, before the LLM, whatever the schedules


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


def is_fraction(budget: float) -> bool:
    """A budget in (0, 1) is a fraction of each row's image tokens; one >= 1 is a number of tokens.

    Fractions carry an experiment across models (0.22 is LLaVA-1.5's 128 of 576 and 32 of the default's
    144); the schedule is solved on the model's nominal image-token count, and each row then keeps the
    stages' fractions of its own tokens."""
    return 0 < budget < 1


def plan_sweep(experiment: Experiment, histograms: dict[int, list[int]] | None = None,
               allow_pending: bool = False) -> list[Combination]:
    """Every combination, budgets solved; impossible budgets and bad locations raise ConfigError.

    ``histograms`` gives calibrated shift histograms of changepoint entries (by schedule index);
    with ``allow_pending`` the entries still waiting for one are left out (validation before loading).
    A calibrated schedule's layers are only known once the model has run, so a budget they cannot
    reach is not bad input: that combination is returned with its ``error`` set (a failed row) and
    the rest of the sweep still runs.
    """
    histograms = histograms or {}
    pending = {c.schedule.index for c in experiment.calibrations} - set(histograms)
    if pending and not allow_pending:
        raise ConfigError(f"changepoint schedule(s) {sorted(pending)} have no shift histogram yet")
    num_layers, num_vision = experiment.model.num_layers, experiment.model.num_vision
    full = float(num_vision)
    combos = [Combination("vanilla", "-", None, [], [], full, full, positions=experiment.positions)]
    calibrated_on = f"@{experiment.data.calibration_split}"  # where a calibrated schedule's layers came from
    for scorer in experiment.scorers:
        own = {"scorer_params": scorer.params, "positions": scorer.positions, "own_positions": scorer.own_positions}
        scorer_class = scorer.component
        schedules: list[tuple[str, ScheduleSpec | None, bool]] = []  # (label, spec, calibrated)
        if scorer_class.pre_llm:
            schedules = [(INTERFACE_SCHEDULE, None, False)]
        else:  # the scorer's own protocol replaces the experiment's schedules
            for spec in scorer.own_schedules or experiment.schedules:
                calibrated = spec.index in histograms
                if spec.calibrates and not calibrated:
                    continue
                schedules.append((spec.label + (calibrated_on if calibrated else ""), spec, calibrated))
        for schedule_label, spec, calibrated in schedules:
            schedule = None if spec is None else spec.build(histograms.get(spec.index) if calibrated else None)
            schedule_params, schedule_name = ({}, "") if spec is None else (spec.params, spec.name)
            for budget in experiment.budgets:
                relative = is_fraction(budget)
                tokens = budget * num_vision if relative else budget
                try:
                    if schedule is None:
                        solved = solve_budget([-1], num_layers, num_vision, tokens, counting=experiment.counting)
                    else:
                        solved = schedule.solve(num_layers, num_vision, tokens, counting=experiment.counting)
                except ValueError as error:
                    message = f"{scorer.name} x {schedule_label} at budget {budget:g}: {error}"
                    if not calibrated:
                        raise ConfigError(message) from None
                    combos.append(Combination(scorer.name, schedule_label, float(budget),
                                              schedule_params=schedule_params, error=message,
                                              schedule_name=schedule_name, **own))
                    continue
                if solved.locations and solved.locations[0] < 0 and scorer_class.needs_llm_attention:
                    able = [n for n in SCORERS.names() if not SCORERS.get(n).needs_llm_attention]
                    raise ConfigError(
                        f"scorer {scorer.name!r} cannot prune at location -1 (before the LLM) in {schedule_label}: "
                        f"it reads attention inside the LLM; use locations >= 0 or one of {able}"
                    )
                keep = [k / num_vision for k in solved.keep] if relative else list(solved.keep)
                combos.append(Combination(
                    scorer.name, schedule_label, float(budget), list(solved.locations), keep,
                    solved.reported_avg, solved.computed_avg, schedule_params=schedule_params,
                    schedule_name=schedule_name, relative=relative, **own,
                ))
    names = [c.name for c in combos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the sweep lists the same combination twice: {duplicates}")
    labels = combination_labels(combos)
    for combo in combos:
        combo.label = labels[combo.name]
    return combos
