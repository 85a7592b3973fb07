"""The datasets of a sweep, opened and checked before the model loads: one :class:`Task` each."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from research.experiment import DataSpec, Experiment
from research.specs import ConfigError


@dataclasses.dataclass
class Task:
    """One dataset of the sweep: its samples, scoring, generation settings and where its files go."""

    name: str
    dataset: Any
    samples: list
    scoring: Any  # research.data.benchmark.Scoring
    max_new_tokens: int
    until: tuple[str, ...]
    folder: str  # where its results, predictions and runs go: "" (one dataset by name), or its name (several)
    data_key: dict  # the data settings its results depend on (part of the fingerprint)


def open_dataset(data: DataSpec, name: str, split: str | None, size: int | None) -> Any:
    """Dataset ``name`` at ``split`` (None: its own), first ``size`` samples; a benchmark read from a snapshot
    gets ``data.paths.<name>`` / ``data.root`` and ``data.options.<name>``. Bad data is one ConfigError line."""
    from research.data import DATASETS
    from research.data.benchmark import SnapshotBenchmark

    factory = DATASETS.get(name)
    options = data.options.get(name, {})
    try:
        if isinstance(factory, type) and issubclass(factory, SnapshotBenchmark):
            return factory(path=data.paths.get(name), root=data.root, split=split, size=size, **options)
        return factory(split=split or "test", size=size, **options)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"data {name!r}: {str(error).splitlines()[0]}") from None


def open_tasks(experiment: Experiment) -> list[Task]:
    """Every dataset of the experiment, opened and checked (text fields read, no image decoded); the split a
    changepoint entry calibrates on is opened too, so a bad one fails before the model loads."""
    from research.data.benchmark import DEFAULT_MAX_NEW_TOKENS, scoring_of

    data = experiment.data
    if experiment.calibrations:
        open_dataset(data, data.names[0], data.calibration_split, 1)
    tasks = []
    for name in data.names:
        dataset = open_dataset(data, name, data.split, data.limit)
        samples = list(dataset)
        if not samples:
            raise ConfigError(f"dataset {name!r} split {getattr(dataset, 'split', data.split)!r} has no samples "
                              f"to evaluate (data.limit={data.limit})")
        key: dict[str, Any] = {**data.settings, "name": name, "split": getattr(dataset, "split", data.split or "test")}
        if hasattr(dataset, "directory"):
            key["path"] = str(Path(dataset.directory).resolve())
        if data.options.get(name):
            key["options"] = data.options[name]
        tokens = experiment.eval.max_new_tokens or getattr(dataset, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        tasks.append(Task(name, dataset, samples, scoring_of(dataset), tokens, tuple(getattr(dataset, "until", ())),
                          name if data.per_benchmark else "", key))
    return tasks


def chance_accuracy(dataset: Any, samples: list) -> float | None:
    """The accuracy of answering uniformly at random among a question's answers, if the dataset knows them
    (``dataset.chance_accuracy(samples)``, e.g. ``shapes``); ``None`` when unknown."""
    if callable(getattr(dataset, "chance_accuracy", None)):
        return dataset.chance_accuracy(samples)
    return None
