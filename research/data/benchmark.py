"""What the evaluation needs from a dataset, and the base of the benchmarks read from lmms-lab snapshots.

A dataset is an iterable of samples with ``id``, ``image``, ``question`` (the prompt as the model gets it),
``answer`` (the reference shown) and optionally ``qtype`` and ``target`` (what the metric reads). Its
:class:`Scoring` turns prediction rows (``{"prediction", "answer", "target", ...}``) into metrics: the
benchmarks implement it themselves; a dataset with only a ``metric(predictions, answers)`` function (``shapes``)
is scored through :class:`AnswerAccuracy`. Generation settings (``max_new_tokens``, ``until``) are the
dataset's, as lmms-eval's task files set them; whether an answer is cut at ``until`` is the model family's
(``VLMAdapter.stop_strings``: as lmms-eval's wrapper for that family does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import pyarrow.parquet as pq

from research.data.snapshot import ImageColumn, ImageRef, SnapshotError, read_columns, shard_files, snapshot_folder
from research.statistics import UnitScores, mean_units

DEFAULT_MAX_NEW_TOKENS = 3  # a dataset that does not say (shapes: one-word answers and </s>)
# lmms-eval's stop strings for a task whose config names none: its ``fewshot_delimiter`` (``api/task.py``)
LMMS_EVAL_DEFAULT_UNTIL = ("\n\n",)


class Scoring(Protocol):
    headline: str  # the key of score()'s summary metric (its column in the Table-1 layout)

    def score(self, rows: Sequence[dict]) -> dict[str, float]: ...

    def sample_score(self, row: dict) -> float: ...

    def units(self, rows: Sequence[dict]) -> dict[str, UnitScores]:
        """The metrics of ``score()`` that have confidence intervals, each as its units (the headline first):
        what :mod:`research.statistics` resamples."""
        ...


@dataclass(frozen=True)
class AnswerAccuracy:
    """The scoring of a dataset that gives a ``metric(predictions, answers) -> float`` function."""

    metric: Callable[[Sequence[str], Sequence[str]], float]
    headline: str = "accuracy"

    def score(self, rows: Sequence[dict]) -> dict[str, float]:
        return {"accuracy": self.metric([r["prediction"] for r in rows], [r["answer"] for r in rows])}

    def sample_score(self, row: dict) -> float:
        return self.metric([row["prediction"]], [row["answer"]])

    def units(self, rows: Sequence[dict]) -> dict[str, UnitScores]:
        """Accuracy: the mean of one score per sample."""
        return {"accuracy": mean_units([r["id"] for r in rows], [self.sample_score(r) for r in rows])}


def scoring_of(dataset: Any) -> Scoring:
    """The dataset's own scoring, else accuracy by its ``metric`` (default: shapes' first-word accuracy)."""
    if callable(getattr(dataset, "score", None)) and callable(getattr(dataset, "sample_score", None)):
        return dataset
    from research.data.shapes import accuracy

    return AnswerAccuracy(getattr(dataset, "metric", accuracy))


@dataclass
class BenchmarkSample:
    id: str
    image: Any  # ImageRef (decoded per batch), a file path, bytes or an array
    question: str  # the prompt exactly as the harness builds it
    answer: str  # the reference answer shown in predictions and overlays
    target: Any = None  # what the metric reads (JSON: reference answers, a record for MME / MMBench pairing)
    qtype: str | None = None  # category: per-category scores in TensorBoard


class SnapshotBenchmark:
    """A benchmark read from a local lmms-lab snapshot (see :mod:`research.data.snapshot`).

    Subclasses set the repository ``folder``, ``splits`` (split -> parquet config, as lmms-eval's task files
    name them), the ``fields`` their task reads, generation settings, and implement ``make_sample`` / ``score``.
    ``pre_prompt`` / ``post_prompt`` are lmms-eval's ``lmms_eval_specific_kwargs.default`` and can be
    overridden per run: ``data.options.<name>.post_prompt="..."``.
    """

    name: ClassVar[str]
    folder: ClassVar[str]  # lmms-lab/<folder>, and its folder under data.root
    splits: ClassVar[dict[str, str | None]]
    default_split: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]
    optional_fields: ClassVar[tuple[str, ...]] = ()  # read when the snapshot has them
    image_field: ClassVar[str] = "image"
    max_new_tokens: ClassVar[int] = 16
    until: ClassVar[tuple[str, ...]] = LMMS_EVAL_DEFAULT_UNTIL  # lmms-eval's stop strings (``until``)
    headline: ClassVar[str] = "accuracy"
    paper_scale: ClassVar[float] = 100.0  # the headline as papers print it (percent)
    pre_prompt: str = ""
    post_prompt: str = "\nAnswer the question using a single word or phrase."

    def __init__(self, path: str | None = None, root: str | None = None, split: str | None = None,
                 size: int | None = None, pre_prompt: str | None = None, post_prompt: str | None = None) -> None:
        self.split = split or self.default_split
        if self.split not in self.splits:
            raise SnapshotError(f"unknown split {self.split!r} for benchmark {self.name!r}; choose one of "
                                f"{list(self.splits)}")
        if size is not None and size < 0:
            raise SnapshotError(f"size must be >= 0, got {size}")
        if pre_prompt is not None:
            self.pre_prompt = pre_prompt
        if post_prompt is not None:
            self.post_prompt = post_prompt
        self.directory = snapshot_folder(self.name, self.folder, root, path)
        self.samples = self.load(size)

    @property
    def description(self) -> str:
        """``benchmark 'gqa' split 'val'``: how errors name this benchmark."""
        return f"benchmark {self.name!r} split {self.split!r}"

    def load(self, size: int | None) -> list[BenchmarkSample]:
        """The first ``size`` samples: text fields read now, each image an :class:`ImageRef` into the shards."""
        files = shard_files(self.directory, self.splits[self.split], self.split)
        present = set(pq.ParquetFile(files[0]).schema_arrow.names)
        columns = self.fields + tuple(f for f in self.optional_fields if f in present)
        table = read_columns(files, columns, self.description)
        rows = table.slice(0, size).to_pylist() if size is not None else table.to_pylist()
        images = self.images(files)
        return [self.make_sample(row, index, ImageRef(images, index)) for index, row in enumerate(rows)]

    def images(self, files: Sequence[Any]) -> ImageColumn:
        return ImageColumn(files, self.image_field, self.description)

    def make_sample(self, row: dict, index: int, image: ImageRef) -> BenchmarkSample:
        raise NotImplementedError

    def prompt(self, question: str) -> str:
        return f"{self.pre_prompt}{question}{self.post_prompt}"

    def __iter__(self) -> Iterator[BenchmarkSample]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def sample_score(self, row: dict) -> float:
        raise NotImplementedError

    def score(self, rows: Sequence[dict]) -> dict[str, float]:
        """Mean per-sample score x100 as ``accuracy`` (the default; MME, POPE and MMBench aggregate their own)."""
        if not rows:
            raise ValueError(f"{self.description}: no predictions to score")
        return {"accuracy": 100.0 * sum(self.sample_score(r) for r in rows) / len(rows)}

    def units(self, rows: Sequence[dict]) -> dict[str, UnitScores]:
        """The default ``accuracy``: 100 x the mean per-sample score, a sample a unit."""
        return {"accuracy": mean_units([r["id"] for r in rows], [self.sample_score(r) for r in rows], 100.0)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, size={len(self)}, directory={str(self.directory)!r})"


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first stop string (lmms-eval's ``until``), stripped."""
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


def log_dropped(name: str, count: int, why: str) -> None:
    if count:
        logging.getLogger(__name__).warning("%s: %d question(s) left out of the score: %s", name, count, why)
