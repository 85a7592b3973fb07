"""The sweep proper (:class:`Sweep`): load the model, calibrate, then every combination in its own Lightning
predict loop on every dataset, reusing finished results; a failing combination is recorded and the others run."""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L

from research.calibration import calibrate
from research.combination import Combination
from research.experiment import Experiment
from research.output import SweepOutput
from research.report.runs import combo_label, earlier_run, run_directory, run_logger, run_path
from research.report.significance import (
    add_seed_spread,
    add_statistics,
    benchmark_statistics_columns,
    combination_seconds,
    settings_of,
    statistics_notes,
)
from research.report.summary import (
    benchmark_columns,
    summarise,
    summarise_benchmarks,
    summary_columns,
)
from research.resume import fingerprint, resume_line, stale_reason
from research.stopping import StopSignal, finished_line
from research.storage import StopSweep, read_json, weights_digest
from research.sweep import plan_sweep
from research.tasks import Task


class Sweep:
    """One resolved experiment's sweep, inside its output directory's lock (``research.run``): the model loaded
    once, the changepoint entries calibrated, then every combination on every dataset, each in its own Lightning
    predict loop, reusing the results that finished before. What has finished is kept on the object, so a stop
    (a failed write, SIGTERM) says what is kept."""

    def __init__(self, experiment: Experiment, output: SweepOutput, tasks: list[Task]) -> None:
        self.experiment, self.output, self.tasks = experiment, output, tasks
        self.results: dict[str, dict[str, dict]] = {t.name: {} for t in tasks}  # dataset -> combination -> result
        # dataset -> the vanilla combination's (accuracy, FLOPs): the references of the pruned ones
        self.vanilla: dict[str, tuple[float | None, float | None]] = {t.name: (None, None) for t in tasks}
        self.running: Path | None = None  # the TensorBoard run being written, until its result is
        self.total = 0  # combinations x datasets

    def run(self) -> list[dict]:
        """The summary rows (vanilla first), or ``[result]`` of an attention analysis."""
        experiment, output = self.experiment, self.output
        output.write_text(output.directory / "config.yaml", experiment.config_yaml)
        L.seed_everything(experiment.seed, verbose=False)
        adapter, processor = experiment.model.load()
        if experiment.analysis is not None:
            return [self.analyse(adapter, processor)]
        combos = plan_sweep(experiment, calibrate(experiment, adapter, processor, output))
        self.total = len(combos) * len(self.tasks)
        try:
            self.run_combinations(combos, adapter, processor)
            return self.summarise(combos)
        except StopSweep as error:
            kept = sum(r["status"] == "ok" for r in self.finished())  # written ones only
            raise StopSweep(f"{error}; kept {kept} finished combination(s) in {output.directory / 'results'}"
                            ) from error
        except StopSignal as stop:
            if self.running is not None:  # the stopped combination's half-written run
                output.replace_run(self.running)
            raise StopSignal(stop.signum, finished_line(self.finished(), output.directory, self.total)) from None

    def finished(self) -> list[dict]:
        return [result for task in self.tasks for result in self.results[task.name].values()]

    def analyse(self, adapter: Any, processor: Any) -> dict:
        """``analysis=text_dynamics|attention_shifts`` on the first dataset, instead of a sweep."""
        from research.analysis.collect import run_analysis

        name = self.experiment.analysis
        self.output.replace_run(self.output.tensorboard(name))
        result = run_analysis(name, adapter, processor, self.tasks[0].samples, self.output.directory,
                              self.experiment.eval.batch_size)
        if "changepoint_layers" in result:
            self.output.print(f"changepoint schedule derived from {result['samples']} samples: layers "
                              f"{result['changepoint_layers']} (histogram {result['histogram']})")
        return result

    def run_combinations(self, combos: list[Combination], adapter: Any, processor: Any) -> None:
        """Each combination on each dataset, in order: reused when it finished before with the same fingerprint,
        recorded as failed when its plan could not be solved, run otherwise."""
        experiment, output = self.experiment, self.output
        self.combos = combos  # the summary run names them (research.run)
        weights = weights_digest(experiment.model.directory)
        pairs = [(task, combo) for combo in combos for task in self.tasks]
        keys = {(t.name, c.name): fingerprint(experiment, c, weights, t) for t, c in pairs}
        files = {(t.name, c.name): output.result_file(c.name, t.folder) for t, c in pairs}
        previous = {pair: read_json(path, "result") for pair, path in files.items()}
        stale = {pair: stale_reason(previous[pair], keys[pair]) for pair in keys}
        output.print(resume_line({f"{c.name}{f' on {t.name}' if t.folder else ''}": stale[t.name, c.name]
                                  for t, c in pairs if not c.error}))
        for index, combo in enumerate(combos, 1):
            for task in self.tasks:
                pair = (task.name, combo.name)
                label = f"[{index}/{len(combos)}] {combo_label(combo)}" + (f" on {task.name}"
                                                                                  if task.folder else "")
                if combo.error:
                    self.running = run_directory(output.directory, combo, task.folder)
                    output.log_failure(combo, experiment.model.num_vision, combo.error, task.folder, anew=True)
                    result = {"combination": combo.__dict__, "fingerprint": keys[pair], "status": "failed",
                              "error": combo.error, "run": run_path(combo, task.folder)}
                elif stale[pair] is None:
                    output.print(f"{label}: reused (finished earlier, unchanged)")
                    result = previous[pair]
                    if output.move_run(earlier_run(result, combo, task.folder), run_path(combo, task.folder)):
                        result = {**result, "run": run_path(combo, task.folder)}
                        output.write_json(files[pair], result)
                else:
                    if previous[pair] is not None:  # its earlier run under another name would stay beside it
                        output.replace_run(output.tensorboard(earlier_run(previous[pair], combo, task.folder)))
                    self.running = output.replace_run(run_directory(output.directory, combo, task.folder))
                    result = run_combination(experiment, combo, adapter, processor, task, self.vanilla[task.name],
                                             output, keys[pair], label)
                    result["run"] = run_path(combo, task.folder)  # where a later re-run finds its run
                    output.write_json(files[pair], result)
                self.results[task.name][combo.name] = result
                self.running = None
                if combo.is_vanilla and result["status"] == "ok":
                    self.vanilla[task.name] = (result["accuracy"], result["flops"])

    def summarise(self, combos: list[Combination]) -> list[dict]:
        """``summary.csv`` / ``summary.md``: one dataset's layout, or Table 1's over several benchmarks, with the
        statistics of every combination (research.report.significance) and what they cost."""
        experiment, output = self.experiment, self.output
        per_benchmark = experiment.data.per_benchmark
        if per_benchmark:
            rows = summarise_benchmarks(combos, self.results, self.tasks)
        else:
            rows = summarise(combos, self.results[self.tasks[0].name])
        settings = settings_of(experiment.eval, experiment.seed)
        start = time.perf_counter()
        extra = {}
        if output.writes:  # rank 0 reads the predictions it wrote
            extra = add_statistics(rows, combos, self.results, self.tasks, output.predictions_file, settings,
                                   per_benchmark)
        add_seed_spread(rows, combos, "avg_ratio" if per_benchmark else "accuracy")
        seconds = time.perf_counter() - start
        if per_benchmark:
            columns = benchmark_columns(self.tasks)
            columns[-2:-2] = benchmark_statistics_columns(self.tasks, extra)  # before status and error
        else:
            columns = summary_columns(extra.get(self.tasks[0].name, ()))
        notes = statistics_notes(settings, seconds, combination_seconds(self.results), combos)
        output.write_summary(rows, columns, per_benchmark, notes)
        if settings.resamples:
            output.print(notes[-1])
        return rows


def run_combination(
    experiment: Experiment, combo: Combination, adapter: Any, processor: Any, task: Task,
    vanilla: tuple[float | None, float | None], output: SweepOutput, key: dict[str, str], label: str = "",
) -> dict:
    """One combination in its own Lightning predict loop; any error is recorded, not raised (except a
    failed write, which stops the sweep). Its predictions replace the old file only once it finished."""
    record: dict[str, Any] = {"combination": combo.__dict__, "fingerprint": key}
    start = time.perf_counter()
    try:
        metrics = predict_combination(experiment, combo, adapter, processor, task, vanilla, output,
                                      label or combo_label(combo))
        return {**record, **metrics, "wall_seconds": time.perf_counter() - start, "status": "ok", "error": ""}
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
        **trainer_options(trainer_settings.devices, trainer_settings.accelerator, trainer_settings.num_nodes),
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
