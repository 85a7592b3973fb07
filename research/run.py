"""``python -m research.run experiment=NAME key=value ...``: every combination of an experiment.

``main(argv)`` only parses; ``run(cfg)`` does the work (and is what tests call). Results go to
``<output_dir>/<experiment>/``: ``summary.csv``, ``summary.md``, ``config.yaml``, ``predictions/``
(JSONL per combination), ``results/`` (JSON per combination: what a re-run reuses) and
``tensorboard/`` (one run per combination, ``<scorer>/<schedule>/b<budget>``, plus ``summary``;
``tensorboard --logdir runs/<experiment>/tensorboard``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import shutil
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from research.config import (
    ConfigError,
    RunConfig,
    dataset_names,
    load_config,
    model_directory,
    model_family,
    model_shape,
    slug,
)
from research.distributed import is_rank_zero, say, watch_rank_zero
from research.resume import fingerprint, resume_line, stale_reason
from research.stopping import StopSignal, stop_on_signals
from research.storage import (
    OutputLock,
    StopSweep,
    read_json,
    remove_stale_temporaries,
    weights_digest,
    write_atomic,
    write_json,
)
from research.sweep import Combination, calibration_split, needs_calibration, plan_sweep

SUMMARY_COLUMNS = [
    "scorer", "schedule", "layers", "budget", "keep", "positions", "accuracy", "accuracy_ratio", "prefill_ms",
    "prefill_p90_ms", "decode_ms_per_token", "scoring_ms", "peak_memory_mb", "gflops", "flops_ratio", "avg_tokens",
    "computed_avg_tokens", "skipped_images", "adjacent_miou", "shift_layers", "relevant_recall", "eval_s", "analysis_s",
    "status", "error",
]


@dataclasses.dataclass
class Task:
    """One dataset of the sweep: its samples, scoring, generation settings and where its files go."""

    name: str
    dataset: Any
    samples: list
    scoring: Any  # research.data.benchmark.Scoring
    max_new_tokens: int
    until: tuple[str, ...]
    subdir: str  # "" for a sweep over one dataset given by name; else the dataset's name (results/<subdir>/...)
    data_key: dict  # the data settings its results depend on (part of the fingerprint)


def open_dataset(cfg: RunConfig, name: str, split: str | None, size: int | None) -> Any:
    """Dataset ``name`` at ``split`` (None: its own), first ``size`` samples; a benchmark read from a snapshot
    gets ``data.paths.<name>`` / ``data.root`` and ``data.options.<name>``. Bad data is one ConfigError line."""
    from research.data import DATASETS
    from research.data.benchmark import SnapshotBenchmark

    factory = DATASETS.get(name)
    options = dict(cfg.data.options.get(name) or {})
    try:
        if isinstance(factory, type) and issubclass(factory, SnapshotBenchmark):
            return factory(path=cfg.data.paths.get(name), root=cfg.data.root, split=split, size=size, **options)
        return factory(split=split or "test", size=size, **options)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"data {name!r}: {str(error).splitlines()[0]}") from None


def open_tasks(cfg: RunConfig) -> list[Task]:
    """Every dataset of ``data.name``, opened and checked (text fields read, no image decoded)."""
    from research.config import dataset_names
    from research.data.benchmark import DEFAULT_MAX_NEW_TOKENS, scoring_of

    names = dataset_names(cfg)
    several = not isinstance(cfg.data.name, str)
    tasks = []
    for name in names:
        dataset = open_dataset(cfg, name, cfg.data.split, cfg.data.limit)
        samples = list(dataset)
        if not samples:
            raise ConfigError(f"dataset {name!r} split {getattr(dataset, 'split', cfg.data.split)!r} has no samples "
                              f"to evaluate (data.limit={cfg.data.limit})")
        key: dict[str, Any] = {"name": name, "split": getattr(dataset, "split", cfg.data.split or "test"),
                               "limit": cfg.data.limit, "calibration_split": cfg.data.calibration_split}
        if hasattr(dataset, "directory"):
            key["path"] = str(Path(dataset.directory).resolve())
        if cfg.data.options.get(name):
            key["options"] = dict(cfg.data.options[name])
        tokens = cfg.eval.max_new_tokens or getattr(dataset, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        tasks.append(Task(name, dataset, samples, scoring_of(dataset), tokens, tuple(getattr(dataset, "until", ())),
                          name if several else "", key))
    if needs_calibration(cfg):
        open_dataset(cfg, names[0], calibration_split(cfg), 1)  # a bad calibration split fails before the model
    return tasks


def run(cfg: RunConfig) -> list[dict]:
    """Run (or resume) every combination on every dataset; return the summary rows (vanilla first)."""
    watch_rank_zero()  # in a copy started for trainer.devices > 1: stop with one line if rank 0 dies
    directory = model_directory(cfg)
    adapter_class = model_family(cfg, directory)
    num_layers, num_vision = model_shape(directory, adapter_class)
    out = Path(cfg.output_dir) / cfg.experiment
    histograms = cached_histograms(cfg, directory)
    plan_sweep(cfg, num_layers, num_vision, histograms, allow_pending=True)  # every check before the model loads
    # With trainer.devices > 1 the other ranks run this same sweep (research.distributed): only rank 0 writes.
    # The lock comes before the data and the model load, so a second run into this directory is told at once.
    with OutputLock(out) if is_rank_zero() else contextlib.nullcontext():
        if is_rank_zero():
            remove_stale_temporaries(out, locked=True)  # of a killed run
            remove_stale_temporaries(Path(cfg.output_dir) / ".cache", locked=False)
        tasks = open_tasks(cfg)
        rows = _sweep(cfg, directory, out, num_layers, num_vision, histograms, tasks, adapter_class)
        if cfg.analysis is None and not tasks[0].subdir and is_rank_zero():
            task = tasks[0]
            try:
                _log_summary_figures(out, rows, len(task.samples), chance_accuracy(task.dataset, task.samples))
            except StopSignal as stop:
                raise StopSignal(stop.signum, finished_line(rows, out)) from None
        return rows


def _sweep(cfg: RunConfig, directory: Path, out: Path, num_layers: int, num_vision: int,
           histograms: dict[int, list[int]], tasks: list[Task], adapter_class: Any) -> list[dict]:
    """The sweep proper, inside the output directory's lock: combinations in order, each on every dataset."""
    if is_rank_zero():
        write_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    weights = weights_digest(directory)

    L.seed_everything(cfg.seed, verbose=False)
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.device_map is not None:
        from research.distributed import load_sharded

        adapter, processor = load_sharded(adapter_class, directory, dtype, cfg.model.attn_implementation,
                                          cfg.model.device_map)
    else:
        adapter, processor = adapter_class.from_pretrained(
            directory, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
    if cfg.analysis is not None:
        from research.analysis.collect import run_analysis

        replace_run(out / "tensorboard" / cfg.analysis)
        result = run_analysis(cfg.analysis, adapter, processor, tasks[0].samples, out, cfg.eval.batch_size)
        if "changepoint_layers" in result:
            print(f"changepoint schedule derived from {result['samples']} samples: layers "
                  f"{result['changepoint_layers']} (histogram {result['histogram']})")
        return [result]
    histograms.update(calibrate(cfg, directory, adapter, processor, histograms, out))
    combos = plan_sweep(cfg, num_layers, num_vision, histograms)

    keys = {(t.name, c.name): fingerprint(cfg, c, weights, t, adapter_class) for t in tasks for c in combos}
    files = {(t.name, c.name): out / "results" / t.subdir / f"{c.name}.json" for t in tasks for c in combos}
    previous = {pair: read_json(path, "result") for pair, path in files.items()}
    stale = {f"{c.name}{f' on {t.name}' if t.subdir else ''}": stale_reason(previous[t.name, c.name],
             keys[t.name, c.name]) for c in combos for t in tasks if not c.error}
    say(resume_line(stale))

    results: dict[str, dict[str, dict]] = {t.name: {} for t in tasks}
    vanilla: dict[str, tuple[float | None, float | None]] = {t.name: (None, None) for t in tasks}
    running: Path | None = None  # the TensorBoard run being written, until its result is
    try:
        for index, combo in enumerate(combos, 1):
            for task in tasks:
                pair = (task.name, combo.name)
                title = combination_title(combo) + (f" on {task.name}" if task.subdir else "")
                label = f"[{index}/{len(combos)}] {title}"
                if combo.error:
                    if is_rank_zero():
                        logging.getLogger(__name__).error("combination %s not run: %s", combo.name, combo.error)
                        running = replace_run(run_directory(out, combo, task.subdir))
                        log_failure(out, combo, num_vision, combo.error, task.subdir)
                    result = {"combination": combo.__dict__, "fingerprint": keys[pair], "status": "failed",
                              "error": combo.error}
                elif stale[f"{combo.name}{f' on {task.name}' if task.subdir else ''}"] is None:
                    say(f"{label}: reused (finished earlier, unchanged)")
                    result = previous[pair]
                else:
                    running = replace_run(run_directory(out, combo, task.subdir))  # a killed run's: logged anew
                    result = _run_combination(cfg, combo, adapter, processor, task, vanilla[task.name], num_vision,
                                              out, keys[pair], label)
                    if is_rank_zero():
                        write_json(files[pair], result)
                results[task.name][combo.name] = result
                running = None
                if combo.is_vanilla and result["status"] == "ok":
                    vanilla[task.name] = (result["accuracy"], result["flops"])
        if tasks[0].subdir:
            rows = summarise_benchmarks(combos, results, tasks)
            if is_rank_zero():
                write_benchmark_summary(out, rows, benchmark_columns(tasks))
            return rows
        rows = summarise(combos, results[tasks[0].name])
        if is_rank_zero():
            write_summary(out, rows)
        return rows
    except StopSweep as error:
        kept = sum(r["status"] == "ok" for t in tasks for r in results[t.name].values())  # written ones only
        raise StopSweep(f"{error}; kept {kept} finished combination(s) in {out / 'results'}") from error
    except StopSignal as stop:
        if running is not None:  # the stopped combination's half-written run
            replace_run(running)
        finished = [r for t in tasks for r in results[t.name].values()]
        raise StopSignal(stop.signum, finished_line(finished, out, len(combos) * len(tasks))) from None


def finished_line(results: list[dict], out: Path, total: int | None = None) -> str:
    """``3 of 11 combinations finished (kept in <out>/results)``: the results (or summary rows) with status ok,
    of ``total`` (default: all of them)."""
    finished = sum(r.get("status") == "ok" for r in results)
    return f"{finished} of {len(results) if total is None else total} combinations finished (kept in {out / 'results'})"


def replace_run(path: Path) -> Path:
    """Remove the TensorBoard run at ``path`` (on rank 0) before it is logged again, so it holds each value once
    even after a killed or an earlier run logged into it; returns ``path``."""
    if is_rank_zero():
        shutil.rmtree(path, ignore_errors=True)
    return path


def cached_histograms(cfg: RunConfig, directory: Path) -> dict[int, list[int]]:
    """Shift histograms of changepoint entries already calibrated on this model, dataset and N."""
    from research.analysis.collect import shift_cache_file

    found = {}
    for index, samples in needs_calibration(cfg):
        path = shift_cache_file(Path(cfg.output_dir) / ".cache", directory, dataset_names(cfg)[0],
                                calibration_split(cfg), samples)
        cached = read_json(path, "calibration cache")
        if cached is not None and isinstance(cached.get("histogram"), list):
            found[index] = cached["histogram"]
    return found


def calibrate(cfg: RunConfig, directory: Path, adapter: Any, processor: Any, known: dict[int, list[int]],
              out: Path) -> dict[int, list[int]]:
    """Derive (and cache, and log) the shift histogram of every changepoint entry not cached yet."""
    from torch.utils.tensorboard import SummaryWriter

    from research.analysis.collect import attention_shift_histogram, log_shift_histogram, shift_cache_file
    from research.config import entry
    from schedules import SCHEDULES

    derived = {}
    split = calibration_split(cfg)
    replace_run(out / "tensorboard" / "calibration")  # every entry is logged below, cached or derived
    for index, samples in needs_calibration(cfg):
        path = shift_cache_file(Path(cfg.output_dir) / ".cache", directory, dataset_names(cfg)[0], split, samples)
        if index in known:
            histogram = known[index]
            say(f"changepoint schedule: reusing the calibration cached in {path}")
        else:
            calibration = list(open_dataset(cfg, dataset_names(cfg)[0], split, samples))
            histogram = attention_shift_histogram(adapter, processor, calibration, cfg.eval.batch_size).tolist()
            if is_rank_zero():
                write_json(path, {"histogram": histogram, "samples": samples, "model": str(directory),
                                  "data": [cfg.data.name, split]})
        derived[index] = histogram
        name, params = entry(cfg.schedules[index])  # the entry's own level / early_fraction / spike_factor
        layers = SCHEDULES.get(name)(**{**params, "histogram": histogram}).propose(len(histogram))
        if not is_rank_zero():
            continue
        print(f"changepoint schedule derived from {samples} samples of the {split!r} split: prune after layers "
              f"{layers}")
        with SummaryWriter(out / "tensorboard" / "calibration") as writer:
            log_shift_histogram(writer, np.asarray(histogram), layers, f"changepoint_{index}")
    return derived


def _run_combination(
    cfg: RunConfig, combo: Combination, adapter: Any, processor: Any, task: Task,
    vanilla: tuple[float | None, float | None], num_vision: int, out: Path, key: dict[str, str], label: str = "",
) -> dict:
    """One combination in its own Lightning predict loop; any error is recorded, not raised (except a
    failed write, which stops the sweep). Its predictions replace the old file only once it finished."""
    record: dict[str, Any] = {"combination": combo.__dict__, "fingerprint": key}
    try:
        metrics = _predict(cfg, combo, adapter, processor, task, vanilla, num_vision, out,
                           out / "predictions" / task.subdir / f"{combo.name}.jsonl", label or combination_title(combo))
        return {**record, **metrics, "status": "ok", "error": ""}
    except StopSweep:
        raise
    except Exception as error:  # one combination failing must not stop the sweep
        logging.getLogger(__name__).error("combination %s failed:\n%s", combo.name, traceback.format_exc())
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        if is_rank_zero():
            log_failure(out, combo, num_vision, message, task.subdir)
        return {**record, "status": "failed", "error": message}


def _predict(cfg: RunConfig, combo: Combination, adapter: Any, processor: Any, task: Task,
             vanilla: tuple[float | None, float | None], num_vision: int, out: Path, predictions: Path,
             label: str) -> dict:
    """The Lightning predict loop of one combination (on ``cfg.trainer.devices`` processes), writing
    ``predictions``; returns its metrics."""
    from research.analysis.per_combination import AttentionDynamicsReport
    from research.distributed import RankZeroReport, batch_loader, predict_in_step, trainer_options
    from research.evaluation import JsonlPredictionWriter, SweepModule, TensorBoardReport, labelled_progress_bar

    samples = task.samples
    module = SweepModule(adapter, processor, combo, combo.positions, task.max_new_tokens, num_vision, task.until)
    reports: list[L.Callback] = []
    if cfg.eval.analysis_samples:
        reports.append(AttentionDynamicsReport(samples[: cfg.eval.analysis_samples], cfg.eval.batch_size))
    reports.append(TensorBoardReport(
        task.scoring, vanilla[0], samples[: cfg.eval.latency_samples], samples[: cfg.eval.overlays],
        cfg.eval.decode_tokens, vanilla_flops=vanilla[1],
    ))
    reports.append(JsonlPredictionWriter(predictions, task.scoring))  # last: only a finished combination replaces it
    report = RankZeroReport(reports)
    trainer = L.Trainer(
        **trainer_options(cfg.trainer.devices, cfg.trainer.accelerator), logger=run_logger(out, combo, task.subdir),
        callbacks=[report, labelled_progress_bar(label)], enable_checkpointing=False, enable_model_summary=False,
    )
    # The batches a single process runs; with several devices each rank runs its share (maybe none).
    loader = batch_loader(samples, cfg.eval.batch_size, trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        predict_in_step(trainer, module, loader, report)
    if not module.metrics:
        raise RuntimeError(f"the predict loop evaluated no samples ({len(samples)} given)")
    return module.metrics


def combination_title(combo: Combination) -> str:
    """``scorer / schedule / budget`` (``vanilla / - / all`` for vanilla)."""
    if combo.is_vanilla:
        return "vanilla / - / all"
    return f"{combo.scorer_label} / {combo.schedule} / {combo.budget:g}"


def run_name(combo: Combination) -> str:
    """The combination's TensorBoard run, ``<scorer>/<schedule>/b<budget>`` (each part a slug; ``vanilla``).

    Nested directories, so ``tensorboard --logdir <output_dir>/<experiment>/tensorboard`` names the runs
    ``text_prior/layers1-10-20/b48``; the file names under ``results/`` and ``predictions/`` keep ``combo.name``.
    """
    if combo.is_vanilla:
        return "vanilla"
    budget = f"b{combo.budget:g}{combo.positions_suffix}"
    return "/".join([slug(combo.scorer_label), slug(combo.schedule), slug(budget)])


def run_logger(out: Path, combo: Combination, subdir: str = "") -> TensorBoardLogger:
    """The TensorBoard logger of one combination: its run directory ``<out>/tensorboard/<run_name(combo)>``
    (``<out>/tensorboard/<benchmark>/<run_name(combo)>`` in a sweep over several benchmarks)."""
    version = f"{subdir}/{run_name(combo)}" if subdir else run_name(combo)
    return TensorBoardLogger(save_dir=out, name="tensorboard", version=version, default_hp_metric=False)


def run_directory(out: Path, combo: Combination, subdir: str = "") -> Path:
    """The directory of :func:`run_logger`'s run."""
    return out / "tensorboard" / subdir / run_name(combo)


def log_failure(out: Path, combo: Combination, num_vision: int, error: str, subdir: str = "") -> None:
    """A failed combination's trace in its TensorBoard run: the text ``status`` with the error, the scalar
    ``metrics/failed`` = 1 and its HParams entry (so the failure shows in the HParams table too)."""
    from research.evaluation import log_hparams

    try:
        logger = run_logger(out, combo, subdir)
        logger.experiment.add_text("status", f"failed: {error}", 0)
        log_hparams(logger, combo, num_vision, {"failed": 1})
        logger.finalize("failed")
    except OSError as failure:  # the trace is a courtesy: the result file and summary still record the failure
        logging.getLogger(__name__).warning("cannot log the failure of %s to TensorBoard: %s", combo.name, failure)


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


def write_summary(out: Path, rows: list[dict]) -> None:
    shown = [c for c in SUMMARY_COLUMNS if c not in ("prefill_p90_ms", "peak_memory_mb")]
    write_tables(out, rows, SUMMARY_COLUMNS, shown)


def write_tables(out: Path, rows: list[dict], columns: list[str], shown: list[str]) -> None:
    """``summary.csv`` with ``columns`` and ``summary.md`` with the ``shown`` ones."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "summary.csv", table.getvalue())
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(row[c]) for c in shown) + " |" for row in rows]
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


def write_benchmark_summary(out: Path, rows: list[dict], columns: list[str]) -> None:
    """``summary.csv`` (every column) and ``summary.md`` in the Table-1 layout."""
    write_tables(out, rows, columns, [c for c in columns if c not in ("layers", "keep", "positions",
                 "computed_avg_tokens") and not c.endswith(tuple(f"_{m}" for m in PER_BENCHMARK_MEASURES))])


def chance_accuracy(dataset: Any, samples: list) -> float | None:
    """The accuracy of answering uniformly at random among a question's answers, if the dataset knows them.

    A dataset exposes it as ``chance_accuracy(samples)``; for ``shapes`` it is computed here from its
    ``ANSWER_CHOICES`` per question type (kept out of ``research/data/shapes.py``: editing that file would
    change every finished combination's dataset fingerprint). ``None`` when unknown.
    """
    if callable(getattr(dataset, "chance_accuracy", None)):
        return dataset.chance_accuracy(samples)
    from research.data.shapes import ANSWER_CHOICES, ShapesVQA

    if isinstance(dataset, ShapesVQA) and samples:
        return sum(1.0 / len(ANSWER_CHOICES[s.qtype]) for s in samples) / len(samples)
    return None


def combination_label(row: dict) -> str:
    """``scorer / schedule / budget`` of a summary row."""
    return f"{row['scorer']} / {row['schedule']} / {row['budget']}"


COMPACT_COLUMNS = {"scorer": "scorer", "schedule": "schedule", "budget": "budget", "accuracy": "accuracy",
                   "accuracy_ratio": "ratio", "flops_ratio": "flops_ratio", "status": "status"}


def compact_columns(rows: list[dict]) -> dict[str, str]:
    """The compact table's columns: :data:`COMPACT_COLUMNS`, or for a Table-1 summary each benchmark's
    headline and the average ratio."""
    if not rows or "accuracy" in rows[0]:
        return COMPACT_COLUMNS
    benchmarks = [c[: -len("_ratio")] for c in rows[0] if c.endswith("_ratio") and c[: -len("_ratio")] in rows[0]]
    return {"scorer": "scorer", "schedule": "schedule", "budget": "budget", **{b: b for b in benchmarks},
            "avg_ratio": "avg_ratio", "status": "status"}


def compact_table(rows: list[dict], width: int = 120) -> str:
    """The key columns of the summary as an aligned table no wider than ``width`` (long scorer and schedule
    labels are shortened with "~"), then one line per failed combination with its (shortened) error."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = compact_columns(rows)
    table = [[cell(row[c]) for c in columns] for row in rows]
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


def _log_summary_figures(out: Path, rows: list[dict], num_samples: int, chance: float | None) -> None:
    """The comparison figures of the experiment, in the ``summary`` run: accuracy vs budget (several budgets
    only), accuracy vs FLOPs ratio and the accuracy ratio of every combination, each marking vanilla (and
    chance, if known) and stating N, the number of evaluated samples."""
    from torch.utils.tensorboard import SummaryWriter

    from research.report.figures import accuracy_ratio_bars, accuracy_vs_budget, accuracy_vs_flops

    ok = [r for r in rows if r["status"] == "ok" and r["scorer"] != "vanilla"]
    vanilla_row = next((r for r in rows if r["scorer"] == "vanilla" and r["status"] == "ok"), None)
    vanilla = float(vanilla_row["accuracy"]) if vanilla_row else None
    n = num_samples - int(vanilla_row["skipped_images"] or 0) if vanilla_row else num_samples
    by_budget: dict[str, list[tuple[float, float]]] = {}
    by_flops: dict[str, list[tuple[float, float]]] = {}
    for r in ok:
        name = f"{r['scorer']} / {r['schedule']}"
        by_budget.setdefault(name, []).append((float(r["budget"]), float(r["accuracy"])))
        if r["flops_ratio"] != "":
            by_flops.setdefault(name, []).append((float(r["flops_ratio"]), float(r["accuracy"])))
    ratios = {combination_label(r): float(r["accuracy_ratio"]) for r in ok if r["accuracy_ratio"] != ""}
    chance_ratio = chance / vanilla if chance is not None and vanilla else None
    replace_run(out / "tensorboard" / "summary")  # each figure once, whatever ran before
    with SummaryWriter(out / "tensorboard" / "summary") as writer:
        if len({r["budget"] for r in ok}) >= 2:
            writer.add_figure("accuracy_vs_budget", accuracy_vs_budget(by_budget, vanilla, chance, n), 0)
        writer.add_figure("accuracy_vs_flops", accuracy_vs_flops(by_flops, vanilla, chance, n), 0)
        writer.add_figure("accuracy_ratio", accuracy_ratio_bars(ratios, chance_ratio, n), 0)


def quiet_lightning(verbose: bool = False) -> None:
    """Keep the terminal for the progress bars: no device banners, tips, "Received SIGTERM" (the stop's own line
    says it), known deprecation noise or the weights-loading bar, unless ``verbose`` (``verbose=true``)."""
    if verbose:
        return
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric",
                 "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    warnings.filterwarnings("ignore", ".*predict returned None.*")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" of every model load


def usage() -> str:
    """``--help``: the command, the experiments and every config key with its default."""
    from research.config import experiment_names

    keys = OmegaConf.to_yaml(OmegaConf.structured(RunConfig)).rstrip()
    return "\n".join([
        "usage: python -m research.run experiment=NAME [key=value ...]",
        "",
        "Runs every scorer x schedule x budget of experiments/NAME.yaml (plus vanilla) and writes",
        "<output_dir>/<experiment>/ (summary, predictions, results, tensorboard). Re-running resumes.",
        "",
        f"experiments: {', '.join(experiment_names())}",
        "",
        "config keys (defaults; an experiment file sets some, key=value overrides):",
        keys,
    ])


def main(argv: list[str] | None = None) -> int:
    """Parse ``key=value`` arguments and run; a bad value exits 2 with one line, before any model loads.

    With ``trainer.devices`` > 1 the copies Lightning starts (ranks 1..N-1) print nothing and exit 0 once the
    sweep is done (rank 0 reports; a rank exiting non-zero makes Lightning kill the others)."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help", "help"} & set(argv):
        print(usage())
        return 0
    try:
        with stop_on_signals():  # SIGTERM, SIGINT: stop at once, keep what finished (research.stopping)
            cfg = load_config(argv)
            quiet_lightning(cfg.verbose)
            rows = run(cfg)  # validates everything before any model loads
    except StopSignal as stop:
        if is_rank_zero():
            print(stop.line(), file=sys.stderr, flush=True)
        return stop.exit_code if is_rank_zero() else 0
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StopSweep as error:
        if not is_rank_zero():
            return 0
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not is_rank_zero():
        return 0
    out = Path(cfg.output_dir) / cfg.experiment
    if cfg.analysis is not None:
        print(f"results in {out}/ (tensorboard --logdir {out / 'tensorboard'})")
        return 0
    print(compact_table(rows))
    print(f"full table in {out / 'summary.md'}; results in {out}/ (tensorboard --logdir {out / 'tensorboard'})")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
