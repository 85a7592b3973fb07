"""The sweep's summary: one row per combination (``summary.csv`` / ``summary.md``), the Table-1 layout over
several benchmarks and the compact terminal table (the ``summary`` TensorBoard run: research.report.board)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from research.combination import Combination
from research.report.significance import statistics_columns
from research.storage import write_atomic

if TYPE_CHECKING:
    from research.tasks import Task


BASE_COLUMNS = [
    "scorer", "schedule", "layers", "budget", "keep", "positions", "accuracy", "accuracy_ratio", "prefill_ms",
    "prefill_p90_ms", "decode_ms_per_token", "scoring_ms", "peak_memory_mb", "gflops", "flops_ratio", "avg_tokens",
    "computed_avg_tokens", "skipped_images", "adjacent_miou", "shift_layers", "relevant_recall", "eval_s", "analysis_s",
    "status", "error",
]


def summary_columns(extra_metrics: Sequence[str] = ()) -> list[str]:
    """``summary.csv``'s columns of one dataset: the base ones with the statistics after ``accuracy_ratio``."""
    at = BASE_COLUMNS.index("accuracy_ratio") + 1
    return BASE_COLUMNS[:at] + statistics_columns(extra_metrics) + BASE_COLUMNS[at:]


SUMMARY_COLUMNS = summary_columns()


def combination_columns(combo: Combination) -> dict[str, Any]:
    """The summary columns that describe a combination (scorer, schedule, layers, budget, keep, positions and
    the reported and computed average tokens)."""
    return {
        "scorer": combo.scorer_label, "schedule": combo.schedule,
        "layers": " ".join(map(str, combo.locations)) or "-",
        "budget": combo.budget if combo.budget is not None else "all",
        "keep": " ".join(map(str, combo.keep)) or "-",
        "positions": "-" if combo.is_vanilla else combo.positions,
        "avg_tokens": "" if combo.error else round(combo.reported_avg, 2),
        "computed_avg_tokens": "" if combo.error else round(combo.computed_avg, 2),
    }


def summarise(combos: list[Combination], results: dict[str, dict]) -> list[dict]:
    vanilla = results.get("vanilla", {})
    rows = []
    for combo in combos:
        r = results[combo.name]
        ok = r["status"] == "ok"
        row = {**combination_columns(combo), "status": r["status"], "error": r.get("error", "")}
        if ok:  # what ran: a scorer that sets its own counts or merges tokens differs from its plan
            row["avg_tokens"] = round(r.get("avg_tokens", combo.reported_avg), 2)
            row["computed_avg_tokens"] = round(r.get("computed_avg_tokens", combo.computed_avg), 2)
        for column in ("accuracy", "prefill_ms", "prefill_p90_ms", "decode_ms_per_token", "scoring_ms",
                       "peak_memory_mb", "gflops"):
            row[column] = round(r[column], 4) if ok else ""
        row["skipped_images"] = r.get("skipped_images", "") if ok else ""
        row.update(dynamics_columns(r) if ok else dict.fromkeys(DYNAMICS_COLUMNS, ""))
        both = ok and vanilla.get("status") == "ok"
        row["accuracy_ratio"] = round(r["accuracy"] / vanilla["accuracy"], 4) if both and vanilla["accuracy"] else ""
        row["flops_ratio"] = round(r["flops"] / vanilla["flops"], 4) if both else ""
        rows.append(row)
    return rows


DYNAMICS_COLUMNS = ("adjacent_miou", "shift_layers", "relevant_recall", "eval_s", "analysis_s")


def dynamics_columns(result: dict) -> dict[str, Any]:
    """The summary's attention-dynamics columns of a finished result ("" where not measured): mean adjacent-layer
    mIoU, shift layers, relevant-patch recall after the last stage, and the seconds of evaluation and observer."""
    def rounded(key: str, digits: int = 4) -> Any:
        value = result.get(key)
        return round(value, digits) if isinstance(value, (int, float)) else ""

    layers = result.get("shift_layers")
    return {"adjacent_miou": rounded("adjacent_miou"), "relevant_recall": rounded("relevant_recall"),
            "shift_layers": " ".join(map(str, layers)) if isinstance(layers, list) else "",
            "eval_s": rounded("eval_seconds", 2), "analysis_s": rounded("analysis_seconds", 2)}


MD_HIDDEN = ("prefill_p90_ms", "peak_memory_mb")  # summary.csv only


def write_summary(out: Path, rows: list[dict], columns: list[str] | None = None, notes: Sequence[str] = ()) -> None:
    """``summary.csv`` (``columns``: :func:`summary_columns`) and ``summary.md``: each metric with its interval
    in one cell, the tests against vanilla and the reference in words, then ``notes`` (method, timing)."""
    columns = columns or SUMMARY_COLUMNS
    extra = [c[: -len("_ci_low")] for c in columns if c.endswith("_ci_low") and c[: -len("_ci_low")] in columns]
    cells = [{**row, **{m: with_interval(row, m) for m in ["accuracy", "accuracy_ratio", *extra]},
              "vs vanilla": versus(row, "delta_vs_vanilla", "p_vs_vanilla", "significant_vs_vanilla"),
              "vs reference": versus(row, "delta_vs_ref", "p_vs_ref", "significant_vs_ref", row.get("reference", "")),
              "seeds": seed_cell(row)} for row in rows]
    statistics = set(statistics_columns(extra)) - set(extra)
    shown = []
    for column in columns:
        if column in MD_HIDDEN or column in statistics:
            continue
        shown.append(column)
        if column == "accuracy_ratio":
            shown += ["vs vanilla", "vs reference", "same_plan_as", "seeds"]
    write_tables(out, rows, columns, shown, cells, notes)


def with_interval(row: dict, metric: str) -> str:
    """A row's ``metric`` with its interval: ``0.514 [0.49, 0.538]`` (see :func:`cell`)."""
    return cell(row.get(metric, ""), row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"))


def number(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` ("" and missing columns, text, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or value == "":
        return None
    try:
        result = float(value)
    except ValueError:
        return None
    return result if math.isfinite(result) else None


def cell(value: Any, low: Any = None, high: Any = None) -> str:
    """A table cell (summary.md, TensorBoard's text table): a number to 4 significant digits with its interval
    where both bounds are known (``0.514 [0.49, 0.54]``; MME's ``1865 [1820, 1903]``); text as it is, ``|``
    escaped."""
    x = number(value)
    if x is None:
        return str(value if value is not None else "").replace("|", "\\|")
    lo, hi = number(low), number(high)
    return f"{x:.4g} [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else f"{x:.4g}"


def versus(row: dict, delta: str, p: str, significant: str, name: str = "") -> str:
    """``-0.0342 [-0.05, -0.02], p=0.001`` or ``n.s.`` marked: a difference, its interval and its corrected p."""
    if row.get(p, "") == "":
        return ""
    bounds = ""
    if row.get(f"{delta.split('_vs_')[0]}_ci_low", "") != "" and delta == "delta_vs_vanilla":
        bounds = f" [{row['delta_ci_low']:+.4g}, {row['delta_ci_high']:+.4g}]"
    mark = " (n.s.)" if row.get(significant) == "no" else ""
    return f"{f'{name}: ' if name else ''}{row[delta]:+.4g}{bounds}, p={row[p]:.3g}{mark}"


def seed_cell(row: dict) -> str:
    """``0.903 ± 0.012 (n=5)``: the mean and standard deviation over the seeds of the row's group."""
    return f"{row['seeds_mean']} ± {row['seeds_sd']} (n={row['seeds_n']})" if row.get("seeds_n", "") != "" else ""


def write_tables(out: Path, rows: list[dict], columns: list[str], shown: list[str],
                 cells: list[dict] | None = None, notes: Sequence[str] = ()) -> None:
    """``summary.csv`` with ``columns`` of ``rows`` and ``summary.md`` with the ``shown`` ones of ``cells``
    (``rows`` by default), then ``notes``."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "summary.csv", table.getvalue())
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in shown) + " |" for row in cells or rows]
    lines += [""] + list(notes) if notes else []
    write_atomic(out / "summary.md", "\n".join(lines) + "\n")


IDENTITY_COLUMNS = ["scorer", "schedule", "layers", "budget", "keep", "positions"]


PER_BENCHMARK_MEASURES = ("prefill_ms", "gflops")  # summary.csv only (AdaptInfer Table 3's columns)


def benchmark_columns(tasks: list[Task]) -> list[str]:
    """The Table-1 layout (AdaptInfer Table 1): per benchmark its headline metric and its ratio to vanilla, then
    the average accuracy ratio, FLOPs ratio and prefill time (means over the benchmarks), then per benchmark the
    skipped images (and any count it reports, e.g. MMBench's unparsed answers)."""
    columns = list(IDENTITY_COLUMNS)
    for task in tasks:
        columns += [task.name, f"{task.name}_ratio"]
    columns += ["avg_ratio", "flops_ratio", "prefill_ms", "avg_tokens", "computed_avg_tokens"]
    for task in tasks:
        columns += [f"{task.name}_{extra}" for extra in getattr(task.dataset, "summary_counts", ())]
        columns.append(f"{task.name}_skipped")
    columns += [f"{task.name}_{measure}" for task in tasks for measure in PER_BENCHMARK_MEASURES]
    return columns + ["status", "error"]


def summarise_benchmarks(combos: list[Combination], results: dict[str, dict[str, dict]],
                         tasks: list[Task]) -> list[dict]:
    """One row per combination over every benchmark (see :func:`benchmark_columns`); a combination is ``ok``
    only when it ran on every benchmark, its ``avg_ratio`` only then; failures name their benchmark."""
    rows = []
    for combo in combos:
        row = combination_columns(combo)
        ratios, flops, prefill, errors = [], [], [], []
        for task in tasks:
            r, base = results[task.name][combo.name], results[task.name].get("vanilla", {})
            ok, both = r["status"] == "ok", r["status"] == "ok" and base.get("status") == "ok"
            row[task.name] = round(r["accuracy"], 4) if ok else ""
            ratio = r["accuracy"] / base["accuracy"] if both and base["accuracy"] else None
            row[f"{task.name}_ratio"] = round(ratio, 4) if ratio is not None else ""
            for extra in getattr(task.dataset, "summary_counts", ()):
                row[f"{task.name}_{extra}"] = round(r[extra]) if ok and extra in r else ""
            row[f"{task.name}_skipped"] = r.get("skipped_images", "") if ok else ""
            for measure in PER_BENCHMARK_MEASURES:
                row[f"{task.name}_{measure}"] = round(r[measure], 4) if ok else ""
            if ratio is not None:
                ratios.append(ratio)
            if both:
                flops.append(r["flops"] / base["flops"])
            if ok:
                prefill.append(r["prefill_ms"])
            else:
                errors.append(f"{task.name}: {r.get('error', '')}")
        complete = len(ratios) == len(tasks)
        row["avg_ratio"] = round(sum(ratios) / len(ratios), 4) if complete else ""
        row["flops_ratio"] = round(sum(flops) / len(flops), 4) if len(flops) == len(tasks) else ""
        row["prefill_ms"] = round(sum(prefill) / len(prefill), 4) if len(prefill) == len(tasks) else ""
        row["status"] = "failed" if errors else "ok"
        row["error"] = "; ".join(errors)
        rows.append(row)
    return rows


def write_benchmark_summary(out: Path, rows: list[dict], columns: list[str], notes: Sequence[str] = ()) -> None:
    """``summary.csv`` (every column) and ``summary.md`` in the Table-1 layout, each benchmark's headline and the
    average ratio with their intervals."""
    intervals = [c[: -len("_ci_low")] for c in columns if c.endswith("_ci_low")]
    statistics = {f"{m}_{bound}" for m in intervals for bound in ("ci_low", "ci_high")}
    statistics |= {c for c in columns if c.endswith(("_p_vs_vanilla", "_p_vs_ref", "_delta"))}
    cells = [{**row, **{m: with_interval(row, m) for m in intervals if m in row}, "seeds": seed_cell(row)}
             for row in rows]
    hidden = ("layers", "keep", "positions", "computed_avg_tokens", "seeds_mean", "seeds_sd", "seeds_n")
    shown = [c for c in columns if c not in hidden and c not in statistics
             and not c.endswith(tuple(f"_{m}" for m in PER_BENCHMARK_MEASURES))]
    write_tables(out, rows, columns, shown + ["seeds"] * any(cell["seeds"] for cell in cells), cells, notes)


def combination_label(row: dict) -> str:
    """``scorer / schedule / budget`` of a summary row."""
    return f"{row['scorer']} / {row['schedule']} / {row['budget']}"


COMPACT_COLUMNS = {"scorer": "scorer", "schedule": "schedule", "budget": "budget", "accuracy": "accuracy",
                   "accuracy_ci": "95% CI", "accuracy_ratio": "ratio", "flops_ratio": "flops_ratio",
                   "vs_reference": "vs ref", "status": "status"}


def compact_columns(rows: list[dict]) -> dict[str, str]:
    """The compact table's columns: :data:`COMPACT_COLUMNS`, or for a Table-1 summary each benchmark's
    headline and the average ratio."""
    if not rows or "accuracy" in rows[0]:
        return COMPACT_COLUMNS
    benchmarks = [c[: -len("_ratio")] for c in rows[0] if c.endswith("_ratio") and c[: -len("_ratio")] in rows[0]]
    return {"scorer": "scorer", "schedule": "schedule", "budget": "budget", **{b: b for b in benchmarks},
            "avg_ratio": "avg_ratio", "avg_ratio_ci": "95% CI", "status": "status"}


def compact_cells(row: dict) -> dict:
    """The compact table's derived cells: an interval as ``low-high`` and the test against the reference as
    ``n.s.`` (not significant) or its corrected p."""
    def bounds(metric: str) -> str:
        low, high = row.get(f"{metric}_ci_low", ""), row.get(f"{metric}_ci_high", "")
        return f"{low:.3g}-{high:.3g}" if low != "" and high != "" else ""

    p = row.get("p_vs_ref", "")
    vs_reference = "" if p == "" else "n.s." if row.get("significant_vs_ref") == "no" else f"p={p:.2g}"
    return {**row, "accuracy_ci": bounds("accuracy"), "avg_ratio_ci": bounds("avg_ratio"),
            "vs_reference": vs_reference}


def compact_table(rows: list[dict], width: int = 120) -> str:
    """The key columns of the summary as an aligned table no wider than ``width`` (long scorer and schedule
    labels are shortened with "~"), then one line per failed combination with its (shortened) error."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = compact_columns(rows)
    cells = [compact_cells(row) for row in rows]
    derived = ("accuracy_ci", "avg_ratio_ci", "vs_reference")  # left out when no row has one (no statistics)
    columns = {c: h for c, h in columns.items() if c not in derived or any(cell[c] for cell in cells)}
    table = [[cell(row.get(c, "")) for c in columns] for row in cells]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(columns.values())]
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    while excess > 0 and max(widths[:2]) > 12:  # shorten the wider of scorer and schedule, a character at a time
        widths[int(widths[1] > widths[0])] -= 1
        excess -= 1

    def fit(text: str, size: int) -> str:
        return text if len(text) <= size else text[: size - 1] + "~"

    lines = ["  ".join(fit(h, w).ljust(w) for h, w in zip(columns.values(), widths)).rstrip()]
    lines += ["  ".join(fit(v, w).ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]
    for row in rows:
        if row["status"] != "ok":
            lines.append(fit(f"failed: {combination_label(row)}: {row['error']}", width))
    return "\n".join(lines)
