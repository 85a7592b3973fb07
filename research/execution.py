"""The sweep proper: load the model, calibrate, then every combination in its own Lightning predict loop on
every dataset, reusing finished results; a failing combination is recorded and the others run."""

from __future__ import annotations

import logging
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L

from research.calibration import calibrate
from research.experiment import Experiment
from research.output import SweepOutput
from research.report.runs import combination_title, run_directory, run_logger
from research.report.summary import (
    benchmark_columns,
    summarise,
    summarise_benchmarks,
)
from research.resume import fingerprint, resume_line, stale_reason
from research.stopping import StopSignal, finished_line
from research.storage import StopSweep, read_json, weights_digest
from research.sweep import Combination, plan_sweep
from research.tasks import Task


def run_sweep(experiment: Experiment, output: SweepOutput, tasks: list[Task]) -> list[dict]:
    """The sweep proper, inside the output directory's lock: combinations in order, each on every dataset."""
    out = output.directory
    output.write_text(out / "config.yaml", experiment.config_yaml)
    L.seed_everything(experiment.seed, verbose=False)
    adapter, processor = experiment.model.load()
    if experiment.analysis is not None:
        from research.analysis.collect import run_analysis

        output.replace_run(output.tensorboard(experiment.analysis))
        result = run_analysis(experiment.analysis, adapter, processor, tasks[0].samples, out,
                              experiment.eval.batch_size)
        if "changepoint_layers" in result:
            print(f"changepoint schedule derived from {result['samples']} samples: layers "
                  f"{result['changepoint_layers']} (histogram {result['histogram']})")
        return [result]
    combos = plan_sweep(experiment, calibrate(experiment, adapter, processor, output))

    weights = weights_digest(experiment.model.directory)
    keys = {(t.name, c.name): fingerprint(experiment, c, weights, t) for t in tasks for c in combos}
    files = {(t.name, c.name): output.result_file(c.name, t.folder) for t in tasks for c in combos}
    previous = {pair: read_json(path, "result") for pair, path in files.items()}
    stale = {f"{c.name}{f' on {t.name}' if t.folder else ''}": stale_reason(previous[t.name, c.name],
             keys[t.name, c.name]) for c in combos for t in tasks if not c.error}
    output.print(resume_line(stale))

    results: dict[str, dict[str, dict]] = {t.name: {} for t in tasks}
    vanilla: dict[str, tuple[float | None, float | None]] = {t.name: (None, None) for t in tasks}
    running: Path | None = None  # the TensorBoard run being written, until its result is
    try:
        for index, combo in enumerate(combos, 1):
            for task in tasks:
                pair = (task.name, combo.name)
                title = combination_title(combo) + (f" on {task.name}" if task.folder else "")
                label = f"[{index}/{len(combos)}] {title}"
                if combo.error:
                    running = run_directory(out, combo, task.folder)
                    output.log_failure(combo, experiment.model.num_vision, combo.error, task.folder, anew=True)
                    result = {"combination": combo.__dict__, "fingerprint": keys[pair], "status": "failed",
                              "error": combo.error}
                elif stale[f"{combo.name}{f' on {task.name}' if task.folder else ''}"] is None:
                    output.print(f"{label}: reused (finished earlier, unchanged)")
                    result = previous[pair]
                else:
                    running = output.replace_run(run_directory(out, combo, task.folder))  # a killed run's: anew
                    result = run_combination(experiment, combo, adapter, processor, task, vanilla[task.name], output,
                                             keys[pair], label)
                    output.write_json(files[pair], result)
                results[task.name][combo.name] = result
                running = None
                if combo.is_vanilla and result["status"] == "ok":
                    vanilla[task.name] = (result["accuracy"], result["flops"])
        if experiment.data.per_benchmark:
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


def run_combination(
    experiment: Experiment, combo: Combination, adapter: Any, processor: Any, task: Task,
    vanilla: tuple[float | None, float | None], output: SweepOutput, key: dict[str, str], label: str = "",
) -> dict:
    """One combination in its own Lightning predict loop; any error is recorded, not raised (except a
    failed write, which stops the sweep). Its predictions replace the old file only once it finished."""
    record: dict[str, Any] = {"combination": combo.__dict__, "fingerprint": key}
    try:
        metrics = predict_combination(experiment, combo, adapter, processor, task, vanilla, output,
                                      label or combination_title(combo))
        return {**record, **metrics, "status": "ok", "error": ""}
    except StopSweep:
        raise
    except Exception as error:  # one combination failing must not stop the sweep
        logging.getLogger(__name__).error("combination %s failed:\n%s", combo.name, traceback.format_exc())
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        output.log_failure(combo, experiment.model.num_vision, message, task.folder)
        return {**record, "status": "failed", "error": message}


def predict_combination(experiment: Experiment, combo: Combination, adapter: Any, processor: Any, task: Task,
                        vanilla: tuple[float | None, float | None], output: SweepOutput, label: str) -> dict:
    """The Lightning predict loop of one combination (on ``trainer.devices`` processes), writing its
    predictions file; returns its metrics."""
    from research.analysis.per_combination import AttentionDynamicsReport
    from research.distributed import RankZeroReport, batch_loader, predict_in_step, trainer_options
    from research.evaluation import CombinationModule, JsonlPredictionWriter, TensorBoardReport
    from research.progress import labelled_progress_bar

    samples = task.samples
    settings, trainer_settings = experiment.eval, experiment.trainer
    module = CombinationModule(adapter, processor, combo, task.max_new_tokens, experiment.model.num_vision,
                               task.until)
    reports: list[L.Callback] = []
    if settings.analysis_samples:
        reports.append(AttentionDynamicsReport(samples[: settings.analysis_samples], settings.batch_size))
    reports.append(TensorBoardReport(
        task.scoring, vanilla[0], samples[: settings.latency_samples], samples[: settings.overlays],
        settings.decode_tokens, vanilla_flops=vanilla[1],
    ))
    predictions = output.predictions_file(combo.name, task.folder)
    reports.append(JsonlPredictionWriter(predictions, task.scoring))  # last: only a finished combination replaces it
    report = RankZeroReport(reports)
    trainer = L.Trainer(
        **trainer_options(trainer_settings.devices, trainer_settings.accelerator),
        logger=run_logger(output.directory, combo, task.folder), callbacks=[report, labelled_progress_bar(label)],
        enable_checkpointing=False, enable_model_summary=False,
    )
    # The batches a single process runs; with several devices each rank runs its share (maybe none).
    loader = batch_loader(samples, settings.batch_size, trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        predict_in_step(trainer, module, loader, report)
    if not module.metrics:
        raise RuntimeError(f"the predict loop evaluated no samples ({len(samples)} given)")
    return module.metrics
