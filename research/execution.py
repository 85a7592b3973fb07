"""The sweep proper: load the model, calibrate, then every combination in its own Lightning predict loop on
every dataset, reusing finished results; a failing combination is recorded and the others run."""

from __future__ import annotations

import logging
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from research.calibration import calibrate
from research.config import RunConfig
from research.output import SweepOutput
from research.report.runs import combination_title, run_directory, run_logger
from research.report.summary import (
    benchmark_columns,
    summarise,
    summarise_benchmarks,
)
from research.resume import fingerprint, resume_line, stale_reason
from research.stopping import StopSignal
from research.storage import StopSweep, read_json, weights_digest
from research.sweep import Combination, plan_sweep
from research.tasks import Task


def run_sweep(cfg: RunConfig, directory: Path, output: SweepOutput, num_layers: int, num_vision: int,
              histograms: dict[int, list[int]], tasks: list[Task], adapter_class: Any) -> list[dict]:
    """The sweep proper, inside the output directory's lock: combinations in order, each on every dataset."""
    out = output.directory
    output.write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
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

        output.replace_run(output.tensorboard(cfg.analysis))
        result = run_analysis(cfg.analysis, adapter, processor, tasks[0].samples, out, cfg.eval.batch_size)
        if "changepoint_layers" in result:
            print(f"changepoint schedule derived from {result['samples']} samples: layers "
                  f"{result['changepoint_layers']} (histogram {result['histogram']})")
        return [result]
    histograms.update(calibrate(cfg, directory, adapter, processor, histograms, output))
    combos = plan_sweep(cfg, num_layers, num_vision, histograms)

    keys = {(t.name, c.name): fingerprint(cfg, c, weights, t, adapter_class) for t in tasks for c in combos}
    files = {(t.name, c.name): output.result_file(c.name, t.subdir) for t in tasks for c in combos}
    previous = {pair: read_json(path, "result") for pair, path in files.items()}
    stale = {f"{c.name}{f' on {t.name}' if t.subdir else ''}": stale_reason(previous[t.name, c.name],
             keys[t.name, c.name]) for c in combos for t in tasks if not c.error}
    output.say(resume_line(stale))

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
                    running = run_directory(out, combo, task.subdir)
                    output.log_failure(combo, num_vision, combo.error, task.subdir, anew=True)
                    result = {"combination": combo.__dict__, "fingerprint": keys[pair], "status": "failed",
                              "error": combo.error}
                elif stale[f"{combo.name}{f' on {task.name}' if task.subdir else ''}"] is None:
                    output.say(f"{label}: reused (finished earlier, unchanged)")
                    result = previous[pair]
                else:
                    running = output.replace_run(run_directory(out, combo, task.subdir))  # a killed run's: anew
                    result = run_combination(cfg, combo, adapter, processor, task, vanilla[task.name], num_vision,
                                             output, keys[pair], label)
                    output.write_json(files[pair], result)
                results[task.name][combo.name] = result
                running = None
                if combo.is_vanilla and result["status"] == "ok":
                    vanilla[task.name] = (result["accuracy"], result["flops"])
        if tasks[0].subdir:
            rows = summarise_benchmarks(combos, results, tasks)
            output.write_summary(rows, benchmark_columns(tasks))
            return rows
        rows = summarise(combos, results[tasks[0].name])
        output.write_summary(rows)
        return rows
    except StopSweep as error:
        kept = sum(r["status"] == "ok" for t in tasks for r in results[t.name].values())  # written ones only
        raise StopSweep(f"{error}; kept {kept} finished combination(s) in {out / 'results'}") from error
    except StopSignal as stop:
        if running is not None:  # the stopped combination's half-written run
            output.replace_run(running)
        finished = [r for t in tasks for r in results[t.name].values()]
        raise StopSignal(stop.signum, finished_line(finished, out, len(combos) * len(tasks))) from None


def finished_line(results: list[dict], out: Path, total: int | None = None) -> str:
    """``3 of 11 combinations finished (kept in <out>/results)``: the results (or summary rows) with status ok,
    of ``total`` (default: all of them)."""
    finished = sum(r.get("status") == "ok" for r in results)
    return f"{finished} of {len(results) if total is None else total} combinations finished (kept in {out / 'results'})"


def run_combination(
    cfg: RunConfig, combo: Combination, adapter: Any, processor: Any, task: Task,
    vanilla: tuple[float | None, float | None], num_vision: int, output: SweepOutput, key: dict[str, str],
    label: str = "",
) -> dict:
    """One combination in its own Lightning predict loop; any error is recorded, not raised (except a
    failed write, which stops the sweep). Its predictions replace the old file only once it finished."""
    record: dict[str, Any] = {"combination": combo.__dict__, "fingerprint": key}
    try:
        metrics = predict_combination(cfg, combo, adapter, processor, task, vanilla, num_vision, output,
                                      label or combination_title(combo))
        return {**record, **metrics, "status": "ok", "error": ""}
    except StopSweep:
        raise
    except Exception as error:  # one combination failing must not stop the sweep
        logging.getLogger(__name__).error("combination %s failed:\n%s", combo.name, traceback.format_exc())
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        output.log_failure(combo, num_vision, message, task.subdir)
        return {**record, "status": "failed", "error": message}


def predict_combination(cfg: RunConfig, combo: Combination, adapter: Any, processor: Any, task: Task,
                        vanilla: tuple[float | None, float | None], num_vision: int, output: SweepOutput,
                        label: str) -> dict:
    """The Lightning predict loop of one combination (on ``cfg.trainer.devices`` processes), writing its
    predictions file; returns its metrics."""
    from research.analysis.per_combination import AttentionDynamicsReport
    from research.distributed import RankZeroReport, batch_loader, predict_in_step, trainer_options
    from research.evaluation import JsonlPredictionWriter, SweepModule, TensorBoardReport
    from research.progress import labelled_progress_bar

    samples = task.samples
    module = SweepModule(adapter, processor, combo, combo.positions, task.max_new_tokens, num_vision, task.until)
    reports: list[L.Callback] = []
    if cfg.eval.analysis_samples:
        reports.append(AttentionDynamicsReport(samples[: cfg.eval.analysis_samples], cfg.eval.batch_size))
    reports.append(TensorBoardReport(
        task.scoring, vanilla[0], samples[: cfg.eval.latency_samples], samples[: cfg.eval.overlays],
        cfg.eval.decode_tokens, vanilla_flops=vanilla[1],
    ))
    predictions = output.predictions_file(combo.name, task.subdir)
    reports.append(JsonlPredictionWriter(predictions, task.scoring))  # last: only a finished combination replaces it
    report = RankZeroReport(reports)
    trainer = L.Trainer(
        **trainer_options(cfg.trainer.devices, cfg.trainer.accelerator),
        logger=run_logger(output.directory, combo, task.subdir), callbacks=[report, labelled_progress_bar(label)],
        enable_checkpointing=False, enable_model_summary=False,
    )
    # The batches a single process runs; with several devices each rank runs its share (maybe none).
    loader = batch_loader(samples, cfg.eval.batch_size, trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        predict_in_step(trainer, module, loader, report)
    if not module.metrics:
        raise RuntimeError(f"the predict loop evaluated no samples ({len(samples)} given)")
    return module.metrics
