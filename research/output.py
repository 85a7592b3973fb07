"""The experiment's output directory, as every process of a sweep sees it.

With ``trainer.devices`` > 1 every process runs the same sweep (``research.distributed``) and only rank 0 writes:
files, TensorBoard runs and terminal lines. :class:`SweepOutput` owns that rule, so the sweep never asks which
rank it runs in: on the other ranks its writes do nothing and its lock is no lock.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from research.distributed import is_rank_zero
from research.experiment import Experiment
from research.storage import OutputLock, remove_stale_temporaries, write_atomic, write_json


@dataclass
class SweepOutput:
    """``<output_dir>/<experiment>/`` and the shared cache ``<output_dir>/.cache/``.

    Layout: ``config.yaml``, ``results/[<benchmark>/]<combination>.json`` (what a re-run reuses),
    ``predictions/[<benchmark>/]<combination>.jsonl``, ``summary.csv`` / ``summary.md`` and ``tensorboard/``.
    """

    directory: Path
    cache: Path
    writes: bool = field(default_factory=is_rank_zero)  # rank 0 (or a single process) writes; the others do not

    @classmethod
    def of(cls, experiment: Experiment) -> SweepOutput:
        return cls(experiment.output_dir, experiment.cache_dir)

    @contextlib.contextmanager
    def locked(self) -> Iterator[SweepOutput]:
        """Hold the directory's lock for the sweep and remove the temporary files a killed run left."""
        if not self.writes:
            yield self
            return
        with OutputLock(self.directory):
            remove_stale_temporaries(self.directory, locked=True)
            remove_stale_temporaries(self.cache, locked=False)
            yield self

    # ---- where things go -----------------------------------------------------------------------
    def result_file(self, name: str, folder: str = "") -> Path:
        return self.directory / "results" / folder / f"{name}.json"

    def predictions_file(self, name: str, folder: str = "") -> Path:
        return self.directory / "predictions" / folder / f"{name}.jsonl"

    def tensorboard(self, run: str = "") -> Path:
        return self.directory / "tensorboard" / run

    # ---- rank 0's writes -----------------------------------------------------------------------
    def print(self, line: str) -> None:
        """A line on the terminal (rank 0 only)."""
        if self.writes:
            print(line, flush=True)

    def write_text(self, path: Path, text: str) -> None:
        if self.writes:
            write_atomic(path, text)

    def write_json(self, path: Path, data: Any) -> None:
        if self.writes:
            write_json(path, data)

    def replace_run(self, path: Path) -> Path:
        """Remove the TensorBoard run at ``path`` before it is logged again (each value once); returns ``path``."""
        from research.report.runs import remove_run

        if self.writes:
            remove_run(path)
        return path

    def move_run(self, old: str, new: str) -> bool:
        """Move the run ``tensorboard/<old>`` to ``tensorboard/<new>`` (research.report.runs.move_run)."""
        from research.report.runs import move_run

        return move_run(self.tensorboard(), old, new) if self.writes else old != new

    def log_failure(self, combo: Any, num_vision: int, error: str, folder: str = "", anew: bool = False) -> None:
        """A failed combination's TensorBoard trace (``anew``: replacing what an earlier run logged there)."""
        from research.report.runs import log_failure, run_directory

        if not self.writes:
            return
        if anew:
            logging.getLogger(__name__).error("combination %s not run: %s", combo.name, error)
            self.replace_run(run_directory(self.directory, combo, folder))
        log_failure(self.directory, combo, num_vision, error, folder)

    def write_summary(self, rows: list[dict], columns: list[str], per_benchmark: bool = False,
                      notes: list[str] | None = None) -> None:
        """``summary.csv`` / ``summary.md``: one dataset's layout, or the several-benchmark one; ``notes`` end
        ``summary.md`` (how the statistics were computed, their cost)."""
        from research.report.summary import write_benchmark_summary, write_summary

        if not self.writes:
            return
        if per_benchmark:
            write_benchmark_summary(self.directory, rows, columns, notes or [])
        else:
            write_summary(self.directory, rows, columns, notes or [])

    def log_summary_run(self, rows: list[dict], combos: list[Any], results: dict[str, dict[str, dict]],
                        folders: dict[str, str], num_samples: int, chance: float | None) -> None:
        """The ``summary`` TensorBoard run and each run's statistics (research.report.board)."""
        from research.report.board import log_summary_run

        if self.writes:
            log_summary_run(self.directory, rows, combos, results, folders, num_samples, chance)

    def log_calibration(self, index: int, histogram: list[int], layers: list[int], samples: int, split: str) -> None:
        """The layers a changepoint entry derived, printed and logged to the ``calibration`` run."""
        from torch.utils.tensorboard import SummaryWriter

        from research.analysis.collect import log_shift_histogram

        if not self.writes:
            return
        print(f"changepoint schedule derived from {samples} samples of the {split!r} split: prune after layers "
              f"{layers}", flush=True)
        group = f"changepoint_schedule_{index}"  # the experiment's schedules[index]
        with SummaryWriter(self.tensorboard("calibration")) as writer:
            log_shift_histogram(writer, np.asarray(histogram), layers, group,
                                f"schedules[{index}]: attention-shift histogram of {samples} samples of split "
                                f"{split!r}")
