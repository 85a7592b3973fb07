"""The combinations of an experiment: vanilla, then every scorer x schedule x budget (solved to keep counts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from research.experiment import Experiment
from research.pruning import PruningPlan
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
    reference: str = ""  # name of the combination it is tested against besides vanilla ("" for none)
    same_plan_as: str = ""  # name of an earlier combination that runs the identical plan ("" for none)

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
    mark_identical_plans(combos)
    assign_references(combos, experiment.reference, complete=not (pending and allow_pending))
    return combos


def plan_key(combo: Combination) -> tuple:
    """What a combination computes: its scorer with its parameters and its plan (schedules that draw the same
    layers and counts run the same thing)."""
    return (combo.scorer_label, combo.positions, tuple(combo.locations), tuple(combo.keep), combo.relative)


def mark_identical_plans(combos: list[Combination]) -> None:
    """Set ``same_plan_as`` on each combination whose plan an earlier one of the sweep runs already (e.g. two
    random-layer seeds that drew the same layers): one result serves both, and figures must not hide one."""
    first: dict[tuple, str] = {}
    for combo in combos:
        if combo.is_vanilla or combo.error:
            continue
        combo.same_plan_as = first.setdefault(plan_key(combo), combo.name)
        if combo.same_plan_as == combo.name:
            combo.same_plan_as = ""


REFERENCE_KEYS = ("scorer", "schedule", "budget")


@dataclass(frozen=True)
class ReferenceSpec:
    """The combination each one is tested against besides vanilla: the one whose scorer / schedule / budget are
    those named (a registry name or a label), the others the combination's own. ``given``: named in the
    configuration (ambiguity or no match is an error); else the default, ``random`` where the sweep has it."""

    scorer: str | None = "random"
    schedule: str | None = None
    budget: float | None = None
    given: bool = False

    def __str__(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in REFERENCE_KEYS if getattr(self, k) is not None)

    def names(self, combo: Combination) -> bool:
        """``combo`` is of the reference kind (has every field the spec names)."""
        return ((self.scorer is None or self.scorer in (combo.scorer, combo.scorer_label))
                and (self.schedule is None or self.schedule in (combo.schedule_name, combo.schedule,
                                                                combo.schedule.split("@")[0]))
                and (self.budget is None or self.budget == combo.budget))

    def serves(self, reference: Combination, combo: Combination) -> bool:
        """``reference`` is ``combo``'s: of the reference kind, and equal to it in every field not named."""
        return (self.names(reference) and reference.positions == combo.positions
                and (self.scorer is not None or reference.scorer_label == combo.scorer_label)
                and (self.schedule is not None or reference.schedule == combo.schedule)
                and (self.budget is not None or reference.budget == combo.budget))


def parse_reference(value: Any) -> ReferenceSpec:
    """``reference``: null (the default), a scorer name or label, or a mapping of scorer / schedule / budget."""
    if value is None:
        return ReferenceSpec()
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return ReferenceSpec(scorer=value, given=True)
    if not isinstance(value, dict) or not value or set(value) - set(REFERENCE_KEYS):
        raise ConfigError(f"reference must be a scorer name or a mapping of {list(REFERENCE_KEYS)}, got {value!r}")
    try:
        budget = None if value.get("budget") is None else float(value["budget"])
    except (TypeError, ValueError):
        raise ConfigError(f"reference budget must be a number, got {value['budget']!r}") from None
    return ReferenceSpec(value.get("scorer"), value.get("schedule"), budget, given=True)


def assign_references(combos: list[Combination], spec: ReferenceSpec, complete: bool = True) -> None:
    """Set each combination's ``reference``. A reference the configuration names must be one combination for
    each that has one and must serve at least one (``complete``: every schedule's layers are known); the default
    takes the first match and may serve none."""
    pruned = [c for c in combos if not c.is_vanilla and not c.error]
    for combo in pruned:
        if spec.names(combo):
            continue  # a reference itself
        matches = [r for r in pruned if r is not combo and spec.serves(r, combo)]
        if len(matches) > 1 and spec.given:
            raise ConfigError(f"reference ({spec}) matches {len(matches)} combinations for {combo.name}: "
                              f"{[m.name for m in matches]}; name one (e.g. its scorer label)")
        combo.reference = matches[0].name if matches else ""
    if spec.given and complete and pruned and not any(c.reference for c in pruned):
        raise ConfigError(f"reference ({spec}) matches no combination of the sweep; its scorers: "
                          f"{sorted({c.scorer_label for c in pruned})}, schedules: "
                          f"{sorted({c.schedule for c in pruned})}")
