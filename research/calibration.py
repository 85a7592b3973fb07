"""Calibration of ``changepoint`` schedules: the model's own attention-shift histogram, cached per model,
dataset, split and N, logged to the ``calibration`` TensorBoard run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from research.config import RunConfig, dataset_names
from research.output import SweepOutput
from research.storage import read_json
from research.sweep import calibration_split, needs_calibration
from research.tasks import open_dataset


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
              output: SweepOutput) -> dict[int, list[int]]:
    """Derive (and cache, and log) the shift histogram of every changepoint entry not cached yet."""
    from research.analysis.collect import attention_shift_histogram, shift_cache_file
    from research.config import entry
    from schedules import SCHEDULES

    derived = {}
    split = calibration_split(cfg)
    output.replace_run(output.tensorboard("calibration"))  # every entry is logged below, cached or derived
    for index, samples in needs_calibration(cfg):
        path = shift_cache_file(output.cache, directory, dataset_names(cfg)[0], split, samples)
        if index in known:
            histogram = known[index]
            output.say(f"changepoint schedule: reusing the calibration cached in {path}")
        else:
            calibration = list(open_dataset(cfg, dataset_names(cfg)[0], split, samples))
            histogram = attention_shift_histogram(adapter, processor, calibration, cfg.eval.batch_size).tolist()
            output.write_json(path, {"histogram": histogram, "samples": samples, "model": str(directory),
                                     "data": [cfg.data.name, split]})
        derived[index] = histogram
        name, params = entry(cfg.schedules[index])  # the entry's own level / early_fraction / spike_factor
        layers = SCHEDULES.get(name)(**{**params, "histogram": histogram}).propose(len(histogram))
        output.log_calibration(index, histogram, layers, samples, split)
    return derived
