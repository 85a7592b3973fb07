"""Calibration of ``changepoint`` schedules: the model's own attention-shift histogram, cached per model,
dataset, split and N, logged to the ``calibration`` TensorBoard run."""

from __future__ import annotations

from typing import Any

from research.experiment import Experiment
from research.output import SweepOutput
from research.tasks import open_dataset


def calibrate(experiment: Experiment, adapter: Any, processor: Any, output: SweepOutput) -> dict[int, list[int]]:
    """The shift histogram of every calibrating changepoint entry (by schedule index): the one cached when the
    experiment was resolved, or derived now (and cached); each logged with the layers it gives."""
    from research.analysis.collect import attention_shift_histogram

    data, histograms = experiment.data, {}
    output.replace_run(output.tensorboard("calibration"))  # every entry is logged below, cached or derived
    for calibration in experiment.calibrations:
        histogram = calibration.cached
        if histogram is not None:
            output.print(f"changepoint schedule: reusing the calibration cached in {calibration.cache_file}")
        else:
            samples = list(open_dataset(data, data.names[0], data.calibration_split, calibration.samples))
            histogram = attention_shift_histogram(adapter, processor, samples, experiment.eval.batch_size).tolist()
            if calibration.cache_file is not None:
                output.write_json(calibration.cache_file, {
                    "histogram": histogram, "samples": calibration.samples,
                    "model": str(experiment.model.directory), "data": [data.names[0], data.calibration_split]})
        schedule = calibration.schedule
        histograms[schedule.index] = histogram
        layers = schedule.build(histogram).propose(len(histogram))  # the entry's own level, spike factor, ...
        output.log_calibration(schedule.index, histogram, layers, calibration.samples, data.calibration_split)
    return histograms
