"""The ``summary`` TensorBoard run, written at the end of every sweep (also a resumed one, also over several
benchmarks), and the statistics it hands each combination's run.

- The sweep's one HParams experiment: every combination's parameters (their union, discrete domains) and every
  ``metrics/<name>`` scalar the runs hold. TensorBoard reads the first experiment it finds, so the combination
  runs write only their sessions (research.report.runs).
- A markdown table of every combination (Text dashboard): the headline metric and its ratio to vanilla with their
  intervals, the difference to vanilla, the p-values, the reference, identical plans, status and shift layers.
- The comparison figures (error bars where the summary has intervals, identical plans marked) and one figure per
  per-layer curve with every run's curve.
- The statistics columns of the summary rows as each run's ``metrics/<column>`` scalars, in an events file of
  their own (``*.statistics``) replaced each time: each value once, whatever ran before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from research.combination import Combination
from research.report.runs import combination_hparams, remove_run, run_name
from research.report.summary import cell, number, with_interval

STATISTICS_SUFFIX = ".statistics"
# single-dataset summary columns written as each run's ``metrics/<column>`` (where a row has a number)
RUN_STATISTICS = ("accuracy_ci_low", "accuracy_ci_high", "delta_vs_vanilla", "delta_ci_low", "delta_ci_high",
                  "accuracy_ratio_ci_low", "accuracy_ratio_ci_high", "p_vs_vanilla", "p_vs_ref")
# several benchmarks: ``<benchmark>_<suffix>`` -> that benchmark's run, as ``metrics/<name>``
BENCHMARK_STATISTICS = {"ci_low": "accuracy_ci_low", "ci_high": "accuracy_ci_high", "p_vs_vanilla": "p_vs_vanilla",
                        "p_vs_ref": "p_vs_ref"}
SHOWN_HPARAMS = ("combination", "scorer", "schedule")  # always among the columns HParams shows by default
SHOWN_IF_DIFFERENT = ("budget", "layers")
TABLE_TAG = "combinations"
CURVES = {"tokens_per_layer": "tokens_per_layer", "dynamics/relevant_recall": "relevant_recall_per_layer"}


def log_summary_run(out: Path, rows: list[dict], combos: list[Combination], results: dict[str, dict[str, dict]],
                    folders: dict[str, str], num_samples: int, chance: float | None) -> None:
    """The ``summary`` run of a sweep and the statistics of its combination runs (see the module docstring).

    Args:
        out: The experiment's output directory.
        rows: The summary rows, one per combination in the order of ``combos``.
        combos: The sweep's combinations.
        results: Dataset -> combination name -> its result.
        folders: Dataset -> the folder of its runs ("" for a single dataset).
        num_samples: Samples of the (first) dataset, stated as N on the figures.
        chance: Chance-level accuracy of the (first) dataset, or ``None``.
    """
    from torch.utils.tensorboard import SummaryWriter

    if len(rows) != len(combos):
        raise ValueError(f"{len(rows)} summary rows for {len(combos)} combinations")
    board = out / "tensorboard"
    labels = [run_name(c) for c in combos]
    several = any(folders.values())
    write_statistics(board, rows, labels, folders)
    run_dirs = [board / folder / label for folder in folders.values() for label in labels]
    remove_run(board / "summary")  # each value once, whatever ran before
    with SummaryWriter(board / "summary") as writer:
        writer.file_writer.add_summary(experiment_summary(combos, metric_tags(run_dirs)))
        writer.add_text(TABLE_TAG, benchmark_table(rows, labels, list(folders)) if several
                        else summary_table(rows, labels), 0)
        same_as = {label: row.get("same_plan_as", "") for label, row in zip(labels, rows) if row.get("same_plan_as")}
        for dataset, folder in folders.items():
            prefix = f"{folder}/" if several else ""
            for tag, key in CURVES.items():
                curves = {label: results[dataset][c.name][key] for label, c in zip(labels, combos)
                          if results[dataset][c.name].get(key)}
                if curves:
                    writer.add_figure(prefix + tag, curve_figure(tag, curves, same_as), 0)
        for tag, figure in comparison_figures(rows, labels, num_samples, chance, several):
            writer.add_figure(tag, figure, 0)


def curve_figure(tag: str, curves: dict[str, Sequence[float]], same_as: dict[str, str]):
    from research.report.figures import RELEVANT_RECALL, TOKENS_PER_LAYER, layer_curves

    return layer_curves(curves, TOKENS_PER_LAYER if tag == "tokens_per_layer" else RELEVANT_RECALL, same_as=same_as)


def write_statistics(board: Path, rows: list[dict], labels: list[str], folders: dict[str, str]) -> None:
    """Each combination run's statistics as ``metrics/<name>`` scalars in its ``*.statistics`` events file, the
    previous one removed first (only runs that exist: a run is written by its combination)."""
    from torch.utils.tensorboard import SummaryWriter

    for folder in folders.values():
        for label, row in zip(labels, rows):
            run_dir = board / folder / label
            if not run_dir.is_dir():
                continue
            for old in run_dir.glob(f"events.out.tfevents.*{STATISTICS_SUFFIX}"):
                old.unlink()
            values = run_statistics(row, folder)
            if values:
                with SummaryWriter(run_dir, filename_suffix=STATISTICS_SUFFIX) as writer:
                    for name, value in values.items():
                        writer.add_scalar(f"metrics/{name}", value, 0)


def run_statistics(row: dict, folder: str) -> dict[str, float]:
    """The numeric statistics of a summary row for the run in ``folder`` ("" for a single dataset)."""
    if not folder:
        pairs = {name: row.get(name) for name in RUN_STATISTICS}
    else:
        pairs = {name: row.get(f"{folder}_{suffix}") for suffix, name in BENCHMARK_STATISTICS.items()}
    return {name: value for name, value in ((k, number(v)) for k, v in pairs.items()) if value is not None}


def metric_tags(run_dirs: list[Path]) -> list[str]:
    """Every ``metrics/<name>`` scalar tag the runs hold, sorted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for run_dir in run_dirs:
        if run_dir.is_dir():
            events = EventAccumulator(str(run_dir), size_guidance={"images": 1, "tensors": 1, "scalars": 1})
            events.Reload()
            tags |= {tag for tag in events.Tags()["scalars"] if tag.startswith("metrics/")}
    return sorted(tags)


def experiment_summary(combos: list[Combination], metrics: list[str]) -> Any:
    """The sweep's HParams experiment: the union of every combination's hparams, each with its discrete domain,
    and ``metrics``. TensorBoard 2.21 sorts the hparams by ``differs`` (True first), then by name, and shows the
    first five by default: ``differs`` is set on combination, scorer, schedule (and budget and layers when they
    vary), so these are the columns a user sees first."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.plugins.hparams.metadata import EXPERIMENT_TAG

    from research.report.runs import hparams_summary

    num_vision = int(next((c.reported_avg for c in combos if c.is_vanilla), 0))
    values: dict[str, set] = {}
    for combo in combos:
        for name, value in combination_hparams(combo, num_vision).items():
            values.setdefault(name, set()).add(value)
    infos = []
    for name, domain in values.items():
        if len({type(v) for v in domain}) > 1:
            domain = {str(v) for v in domain}
        shown = name in SHOWN_HPARAMS or (name in SHOWN_IF_DIFFERENT and len(domain) > 1)
        info = api_pb2.HParamInfo(name=name, differs=shown)
        hp.Discrete(domain).update_hparam_info(info)
        infos.append(info)
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=[hp.Metric(tag).as_proto() for tag in metrics],
                                    time_created_secs=time.time())
    return hparams_summary(EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def status_cell(row: dict) -> str:
    return "ok" if row["status"] == "ok" else f"failed: {cell(row.get('error', ''))}"


def p_ref_cell(row: dict) -> str:
    """The p-value against the reference, marked ``(n.s.)`` where the difference is not significant."""
    text = cell(row.get("p_vs_ref", ""))
    return f"{text} (n.s.)" if row.get("significant_vs_ref") == "no" else text


def markdown(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(line) + " |" for line in lines])


def summary_table(rows: list[dict], labels: list[str]) -> str:
    """The single-dataset table: one line per combination (see the module docstring); "" where not known."""
    header = ["combination", "accuracy", "ratio to vanilla", "delta vs vanilla", "p vs vanilla", "reference",
              "p vs reference", "same plan as", "status", "shift layers"]
    lines = [[
        f"`{label}`", with_interval(row, "accuracy"), with_interval(row, "accuracy_ratio"),
        cell(row.get("delta_vs_vanilla"), row.get("delta_ci_low"), row.get("delta_ci_high")),
        cell(row.get("p_vs_vanilla", "")), cell(row.get("reference", "")), p_ref_cell(row),
        cell(row.get("same_plan_as", "")), status_cell(row), cell(row.get("shift_layers", "")),
    ] for label, row in zip(labels, rows)]
    return markdown(header, lines)


def benchmark_table(rows: list[dict], labels: list[str], benchmarks: list[str]) -> str:
    """The several-benchmark table: per benchmark its headline with its interval and p against vanilla, then the
    average ratio with its interval, status."""
    header = ["combination", *benchmarks, "avg ratio", "status"]
    lines = []
    for label, row in zip(labels, rows):
        scores = []
        for name in benchmarks:
            score = with_interval(row, name)
            p = number(row.get(f"{name}_p_vs_vanilla"))
            scores.append(score + (f" (p {p:.3g})" if p is not None else ""))
        average = with_interval(row, "avg_ratio")
        lines.append([f"`{label}`", *scores, average, status_cell(row)])
    return markdown(header, lines)


def comparison_figures(rows: list[dict], labels: list[str], num_samples: int, chance: float | None,
                       several: bool) -> list[tuple[str, Any]]:
    """``(tag, figure)`` of the comparison figures: accuracy vs budget (several budgets only), accuracy vs FLOPs
    ratio and the accuracy ratio of every combination; over several benchmarks the average ratio only."""
    from research.report.figures import Point, accuracy_ratio_bars, accuracy_vs_budget, accuracy_vs_flops

    pruned = [(label, r) for label, r in zip(labels, rows) if r["status"] == "ok" and label != "vanilla"]
    same_as = {label: r["same_plan_as"] for label, r in pruned if r.get("same_plan_as")}
    if several:
        ratios = {label: float(r["avg_ratio"]) for label, r in pruned if number(r.get("avg_ratio")) is not None}
        return [("avg_ratio", accuracy_ratio_bars(ratios, intervals=intervals(pruned, "avg_ratio"),
                                                  same_as=same_as))]
    vanilla_row = next((r for label, r in zip(labels, rows) if label == "vanilla" and r["status"] == "ok"), None)
    vanilla = float(vanilla_row["accuracy"]) if vanilla_row else None
    n = num_samples - int(vanilla_row.get("skipped_images") or 0) if vanilla_row else num_samples
    by_budget: dict[str, list[Point]] = {}
    by_flops: dict[str, list[Point]] = {}
    for label, r in pruned:
        line = series_name(label, r)
        low, high, same = number(r.get("accuracy_ci_low")), number(r.get("accuracy_ci_high")), same_as.get(label, "")
        by_budget.setdefault(line, []).append(Point(float(r["budget"]), float(r["accuracy"]), low, high, same))
        if number(r.get("flops_ratio")) is not None:
            by_flops.setdefault(line, []).append(Point(float(r["flops_ratio"]), float(r["accuracy"]), low, high,
                                                       same))
    ratios = {label: float(r["accuracy_ratio"]) for label, r in pruned if number(r.get("accuracy_ratio")) is not None}
    chance_ratio = chance / vanilla if chance is not None and vanilla else None
    figures = []
    if len({r["budget"] for _, r in pruned}) >= 2:
        figures.append(("accuracy_vs_budget", accuracy_vs_budget(by_budget, vanilla, chance, n)))
    figures.append(("accuracy_vs_flops", accuracy_vs_flops(by_flops, vanilla, chance, n)))
    figures.append(("accuracy_ratio", accuracy_ratio_bars(ratios, chance_ratio, n, intervals(pruned, "accuracy_ratio"),
                                                          same_as)))
    return figures


def series_name(label: str, row: dict) -> str:
    """A line over budgets: the combination's label without its budget part."""
    budget = number(row.get("budget"))
    if budget is None:
        return label
    from research.report.labels import budget_part

    parts = label.split("/")
    return "/".join(p for p in parts if p != budget_part(budget)) or label


def intervals(pruned: list[tuple[str, dict]], column: str) -> dict[str, tuple[float, float]]:
    """Label -> ``(<column>_ci_low, <column>_ci_high)`` where both are known."""
    found = {}
    for label, r in pruned:
        low, high = number(r.get(f"{column}_ci_low")), number(r.get(f"{column}_ci_high"))
        if low is not None and high is not None:
            found[label] = (low, high)
    return found
