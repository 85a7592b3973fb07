"""The combinations of an experiment: vanilla, then every scorer x schedule x budget (solved to keep counts)."""

from __future__ import annotations

import logging

from research.combination import Combination
from research.experiment import Experiment
from research.report.labels import combination_labels
from research.specs import ConfigError, ReferenceSpec, ScheduleSpec
from schedules import solve_budget
from scorers import SCORERS

INTERFACE_SCHEDULE = "interface"  # pre-LLM scorers prune once, before the LLM, whatever the schedules


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
    mark_identical_plans(combos)
    assign_references(combos, experiment.reference, warn=not allow_pending)
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


def assign_references(combos: list[Combination], spec: ReferenceSpec, warn: bool = True) -> None:
    """Set each combination's ``reference``. A reference the configuration names must be one combination for
    each that has one (else a ConfigError line); one that serves none (an experiment's reference with its
    schedules overridden) is a warning (``warn``: the sweep's final plan). The default takes the first match."""
    pruned = [c for c in combos if not c.is_vanilla and not c.error]
    for combo in pruned:
        if spec.names(combo):
            continue  # a reference itself
        matches = [r for r in pruned if r is not combo and spec.serves(r, combo)]
        if len(matches) > 1 and spec.given:
            raise ConfigError(f"reference ({spec}) matches {len(matches)} combinations for {combo.name}: "
                              f"{[m.name for m in matches]}; name one (e.g. its scorer label)")
        combo.reference = matches[0].name if matches else ""
    if spec.given and warn and pruned and not any(c.reference for c in pruned):  # e.g. schedules= overridden
        logging.getLogger(__name__).warning(
            "reference (%s) matches no combination of this sweep, so nothing is tested against it; its scorers: "
            "%s, schedules: %s", spec, sorted({c.scorer_label for c in pruned}), sorted({c.schedule for c in pruned}))
