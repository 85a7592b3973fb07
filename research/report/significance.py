"""The statistics of a sweep's summary: which differences are larger than their noise.

For every finished combination, from its predictions file (one prediction per sample, scored again by its
benchmark into units: :meth:`research.data.benchmark.Scoring.units`):

* each metric with units (the headline, and e.g. POPE's F1) with its paired bootstrap interval;
* against vanilla: the difference and the accuracy ratio with their intervals, resampling the same units for both,
  and the p-value of the difference (McNemar's exact test on 0/1 units, a paired permutation test otherwise);
* against the combination's reference (:class:`research.sweep.ReferenceSpec`): the difference and its p-value;
* p-values Holm-corrected over the combinations of the experiment (per benchmark, per family: vs vanilla, vs the
  reference); ``significant_vs_*`` says whether the corrected p is below ``1 - eval.confidence``;
* Table 1's average ratio over benchmarks with its interval, each benchmark resampled on its own;
* combinations that differ only by their seed (``seeds: [...]``): the mean and spread of the headline over seeds.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from research.combination import Combination
from research.report.runs import combo_label
from research.statistics import (
    BootstrapSettings,
    Estimate,
    UnitScores,
    compare,
    holm,
    interval,
    mean_ratio,
    paired_p,
)

if TYPE_CHECKING:
    from research.tasks import Task

PredictionsFile = Callable[[str, str], Path]  # (combination name, dataset folder) -> its predictions file
REFERENCE_COLUMNS = ["reference", "same_plan_as", "seeds_mean", "seeds_sd", "seeds_n"]
COMPARISON_COLUMNS = ["delta_vs_vanilla", "delta_ci_low", "delta_ci_high", "accuracy_ratio_ci_low",
                      "accuracy_ratio_ci_high", "p_vs_vanilla", "significant_vs_vanilla", "delta_vs_ref", "p_vs_ref",
                      "significant_vs_ref"]


def statistics_columns(extra_metrics: Sequence[str] = ()) -> list[str]:
    """The single-dataset summary's statistics columns (``extra_metrics``: metrics besides the headline with
    intervals, e.g. POPE's ``f1``)."""
    columns = ["accuracy_ci_low", "accuracy_ci_high", *COMPARISON_COLUMNS]
    for metric in extra_metrics:
        columns += [metric, f"{metric}_ci_low", f"{metric}_ci_high"]
    return columns + REFERENCE_COLUMNS


def benchmark_statistics_columns(tasks: Sequence[Task], extra_metrics: dict[str, Sequence[str]]) -> list[str]:
    """The Table-1 summary's statistics columns: per benchmark its headline's interval, its ratio's interval and
    its p-values; then the average ratio's interval."""
    columns = []
    for task in tasks:
        name = task.name
        columns += [f"{name}_ci_low", f"{name}_ci_high", f"{name}_ratio_ci_low", f"{name}_ratio_ci_high",
                    f"{name}_delta", f"{name}_p_vs_vanilla", f"{name}_p_vs_ref"]
        for metric in extra_metrics.get(name, ()):
            columns += [f"{name}_{metric}", f"{name}_{metric}_ci_low", f"{name}_{metric}_ci_high"]
    return columns + ["avg_ratio_ci_low", "avg_ratio_ci_high"] + REFERENCE_COLUMNS


def settings_of(eval_settings: Any, seed: int) -> BootstrapSettings:
    return BootstrapSettings(eval_settings.bootstrap, eval_settings.confidence, eval_settings.interval, seed)


def read_predictions(path: Path) -> list[dict] | None:
    """The rows of a predictions file (``None`` when it is missing or unreadable)."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as error:
        logging.getLogger(__name__).warning("no statistics from %s: %s", path, error)
        return None


def task_units(predictions: PredictionsFile, task: Task, combos: Sequence[Combination],
               results: dict[str, dict]) -> dict[str, dict[str, UnitScores]]:
    """Per finished combination, its metrics' units on ``task``, from its predictions file."""
    units = {}
    for combo in combos:
        if results.get(combo.name, {}).get("status") != "ok":
            continue
        rows = read_predictions(predictions(combo.name, task.folder))
        if rows:
            units[combo.name] = task.scoring.units(rows)
    return units


def task_statistics(units: dict[str, dict[str, UnitScores]], combos: Sequence[Combination], headline: str,
                    settings: BootstrapSettings) -> dict[str, dict[str, Any]]:
    """Per combination with units: ``{metric: Estimate}`` for every metric, and for the headline against
    vanilla ``delta`` / ``ratio`` (Estimates) and ``p_vs_vanilla``, against its reference ``delta_vs_ref`` and
    ``p_vs_ref``; p-values Holm-corrected over the combinations, ``significant_vs_*`` from them."""
    vanilla = units.get("vanilla")
    out: dict[str, dict[str, Any]] = {}
    for combo in combos:
        own = units.get(combo.name)
        if own is None:
            continue
        stats: dict[str, Any] = {}
        for metric, scores in own.items():
            if combo.is_vanilla or vanilla is None or metric not in vanilla:
                stats[metric] = interval(scores, settings)
                continue
            comparison = compare(scores, vanilla[metric], settings)
            stats[metric] = comparison.metric
            if metric == headline:
                stats.update(delta=comparison.delta, ratio=comparison.ratio,
                             p_vs_vanilla=paired_p(scores, vanilla[metric], settings))
        reference = units.get(combo.reference) if combo.reference else None
        if reference is not None:
            stats["delta_vs_ref"] = own[headline].value() - reference[headline].value()
            stats["p_vs_ref"] = paired_p(own[headline], reference[headline], settings)
        out[combo.name] = stats
    for family in ("p_vs_vanilla", "p_vs_ref"):
        names = [name for name, stats in out.items() if family in stats]
        for name, adjusted in zip(names, holm([out[name][family] for name in names])):
            out[name][family] = adjusted
            out[name][family.replace("p_", "significant_")] = "yes" if adjusted < settings.alpha else "no"
    return out


def _rounded(value: float | None, digits: int = 4) -> Any:
    return "" if value is None or not np.isfinite(value) else round(float(value), digits)


def _p(value: float | None) -> Any:
    return "" if value is None else float(f"{value:.3g}")


def _bounds(row: dict, prefix: str, estimate: Estimate | None) -> None:
    row[f"{prefix}_ci_low"] = _rounded(estimate.low) if estimate else ""
    row[f"{prefix}_ci_high"] = _rounded(estimate.high) if estimate else ""


def add_statistics(rows: list[dict], combos: Sequence[Combination], results: dict[str, dict[str, dict]],
                   tasks: Sequence[Task], predictions: PredictionsFile, settings: BootstrapSettings,
                   per_benchmark: bool) -> dict[str, list[str]]:
    """Fill the statistics columns of the summary ``rows`` (one per combination, in ``combos``' order); returns
    per benchmark the metrics besides its headline that got intervals (e.g. POPE's ``f1``)."""
    names = {combo.name: combo for combo in combos}
    for row, combo in zip(rows, combos):
        row["reference"] = combo_label(names[combo.reference]) if combo.reference else ""
        row["same_plan_as"] = combo_label(names[combo.same_plan_as]) if combo.same_plan_as else ""
    if settings.resamples == 0:
        return {}
    units = {task.name: task_units(predictions, task, combos, results[task.name]) for task in tasks}
    stats = {task.name: task_statistics(units[task.name], combos, task.scoring.headline, settings) for task in tasks}
    for row, combo in zip(rows, combos):
        if per_benchmark:
            _benchmark_row(row, combo, tasks, units, stats, settings)
        else:
            _single_row(row, stats[tasks[0].name].get(combo.name, {}), tasks[0].scoring.headline)
    return {task.name: sorted({metric for own in units[task.name].values() for metric in own}
                              - {task.scoring.headline}) for task in tasks}


def _single_row(row: dict, stats: dict[str, Any], headline: str) -> None:
    _bounds(row, "accuracy", stats.get(headline))
    delta, ratio = stats.get("delta"), stats.get("ratio")
    row["delta_vs_vanilla"] = _rounded(delta.value) if delta else ""
    _bounds(row, "delta", delta)
    _bounds(row, "accuracy_ratio", ratio)
    for key in ("p_vs_vanilla", "p_vs_ref"):
        row[key] = _p(stats.get(key))
    for key in ("significant_vs_vanilla", "significant_vs_ref"):
        row[key] = stats.get(key, "")
    row["delta_vs_ref"] = _rounded(stats.get("delta_vs_ref"))
    for metric, estimate in stats.items():
        if isinstance(estimate, Estimate) and metric not in (headline, "delta", "ratio"):
            row[metric] = _rounded(estimate.value)
            _bounds(row, metric, estimate)


def _benchmark_row(row: dict, combo: Combination, tasks: Sequence[Task], units: dict, stats: dict,
                   settings: BootstrapSettings) -> None:
    pairs = []
    for task in tasks:
        name, own = task.name, stats[task.name].get(combo.name, {})
        headline = task.scoring.headline
        _bounds(row, name, own.get(headline))
        _bounds(row, f"{name}_ratio", own.get("ratio"))
        row[f"{name}_delta"] = _rounded(own["delta"].value) if "delta" in own else ""
        row[f"{name}_p_vs_vanilla"] = _p(own.get("p_vs_vanilla"))
        row[f"{name}_p_vs_ref"] = _p(own.get("p_vs_ref"))
        for metric, estimate in own.items():
            if isinstance(estimate, Estimate) and metric not in (headline, "delta", "ratio"):
                row[f"{name}_{metric}"] = _rounded(estimate.value)
                _bounds(row, f"{name}_{metric}", estimate)
        task_units_ = units[task.name]
        if not combo.is_vanilla and combo.name in task_units_ and "vanilla" in task_units_:
            pairs.append((task_units_[combo.name][headline], task_units_["vanilla"][headline]))
    _bounds(row, "avg_ratio", mean_ratio(pairs, settings) if len(pairs) == len(tasks) else None)


def seed_key(combo: Combination) -> tuple | None:
    """What a combination is apart from its seed (``None`` when neither its scorer nor its schedule has one)."""
    if "seed" not in combo.scorer_params and "seed" not in combo.schedule_params:
        return None
    without = [tuple(sorted((k, json.dumps(v)) for k, v in params.items() if k != "seed"))
               for params in (combo.scorer_params, combo.schedule_params)]
    return (combo.scorer, combo.schedule_name or combo.schedule, *without, combo.budget, combo.positions)


def add_seed_spread(rows: list[dict], combos: Sequence[Combination], column: str) -> None:
    """On each row of a group of combinations that differ only by seed: the mean, standard deviation (n - 1)
    and count over the group's seeds of ``column`` (finished rows only)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, combo in enumerate(combos):
        key = seed_key(combo)
        if key is not None:
            groups[key].append(index)
    for row in rows:
        row.update(seeds_mean="", seeds_sd="", seeds_n="")
    for members in groups.values():
        values = [float(rows[i][column]) for i in members if rows[i]["status"] == "ok" and rows[i][column] != ""]
        if len(members) < 2 or len(values) < 2:
            continue
        for i in members:
            rows[i].update(seeds_mean=round(float(np.mean(values)), 4),
                           seeds_sd=round(float(np.std(values, ddof=1)), 4), seeds_n=len(values))


def combination_seconds(results: dict[str, dict[str, dict]]) -> float:
    """The combinations' own wall time, summed over datasets (reused ones: the time they took when they ran)."""
    total = 0.0
    for by_combo in results.values():
        for result in by_combo.values():
            seconds = result.get("wall_seconds")
            if seconds is None:
                seconds = (result.get("eval_seconds") or 0.0) + (result.get("analysis_seconds") or 0.0)
            total += float(seconds)
    return total


def statistics_notes(settings: BootstrapSettings, seconds: float, combinations: float,
                     combos: Sequence[Combination]) -> list[str]:
    """The lines ending ``summary.md``: how the intervals and tests were computed, and their cost against the
    combinations' own wall time."""
    if settings.resamples == 0:
        return ["No intervals or tests (eval.bootstrap=0)."]
    tested = sum(not c.is_vanilla for c in combos)
    share = f", {100 * seconds / combinations:.2f}% of the combinations' {combinations:.1f} s" if combinations else ""
    return [
        f"Intervals: {settings.confidence:.0%} paired bootstrap ({settings.method}, {settings.resamples} resamples, "
        f"seed {settings.seed}) over each benchmark's units (a sample; MME: an image's question pair within its "
        "subtask; MMBench: a question with its circular copies), the same units for a combination and the one it "
        "is compared with. p: McNemar's exact test where every unit scores 0 or 1, else a paired permutation test; "
        f"Holm-corrected over the {tested} pruned combinations (vs vanilla, vs the reference: two families); "
        f"n.s.: corrected p >= {settings.alpha:.2g}.",
        f"timing: statistics {seconds:.2f} s{share}.",
    ]
