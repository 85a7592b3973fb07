"""The datasets of a sweep, opened and checked before the model loads: one :class:`Task` each."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from research.config import ConfigError, RunConfig
from research.sweep import calibration_split, needs_calibration


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


def chance_accuracy(dataset: Any, samples: list) -> float | None:
    """The accuracy of answering uniformly at random among a question's answers, if the dataset knows them
    (``dataset.chance_accuracy(samples)``, e.g. ``shapes``); ``None`` when unknown."""
    if callable(getattr(dataset, "chance_accuracy", None)):
        return dataset.chance_accuracy(samples)
    return None
