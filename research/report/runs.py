"""TensorBoard runs of a sweep: one per combination (``<scorer>/<schedule>/b<budget>``), its failure trace, and
replacing a run that is logged again (so each value is there once)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from research.specs import slug
from research.sweep import Combination


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


def run_logger(out: Path, combo: Combination, folder: str = "") -> TensorBoardLogger:
    """The TensorBoard logger of one combination: its run directory ``<out>/tensorboard/<run_name(combo)>``
    (``<out>/tensorboard/<benchmark>/<run_name(combo)>`` in a sweep over several benchmarks)."""
    version = f"{folder}/{run_name(combo)}" if folder else run_name(combo)
    return TensorBoardLogger(save_dir=out, name="tensorboard", version=version, default_hp_metric=False)


def run_directory(out: Path, combo: Combination, folder: str = "") -> Path:
    """The directory of :func:`run_logger`'s run."""
    return out / "tensorboard" / folder / run_name(combo)


def log_failure(out: Path, combo: Combination, num_vision: int, error: str, folder: str = "") -> None:
    """A failed combination's trace in its TensorBoard run: the text ``status`` with the error, the scalar
    ``metrics/failed`` = 1 and its HParams entry (so the failure shows in the HParams table too)."""
    try:
        logger = run_logger(out, combo, folder)
        logger.experiment.add_text("status", f"failed: {error}", 0)
        log_hparams(logger, combo, num_vision, {"failed": 1})
        logger.finalize("failed")
    except OSError as failure:  # the trace is a courtesy: the result file and summary still record the failure
        logging.getLogger(__name__).warning("cannot log the failure of %s to TensorBoard: %s", combo.name, failure)


def remove_run(path: Path) -> None:
    """Remove the TensorBoard run at ``path`` before it is logged again, so it holds each value once even after a
    killed or an earlier run logged into it (rank 0 only: :meth:`research.output.SweepOutput.replace_run`)."""
    shutil.rmtree(path, ignore_errors=True)


def combination_hparams(combo: Combination, num_vision: int) -> dict[str, Any]:
    """The HParams-table columns of a combination: scorer, schedule, budget, layers, keep, positions and the
    scorer's and schedule's own parameters (``scorer.<name>``, ``schedule.<name>``, as strings)."""
    hparams: dict[str, Any] = {
        "scorer": combo.scorer_label, "schedule": combo.schedule, "budget": combo.budget or float(num_vision),
        "layers": str(combo.locations), "keep": str(combo.keep), "positions": combo.positions,
    }
    for prefix, params in (("scorer", combo.scorer_params), ("schedule", combo.schedule_params)):
        for name, value in sorted(params.items()):
            hparams[f"{prefix}.{name}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    return hparams


def log_hparams(logger: Any, combo: Combination, num_vision: int, metrics: dict[str, float]) -> None:
    """The combination's HParams entry with ``metrics`` written once, as the scalars ``metrics/<name>``, and its
    ``hparams.yaml`` (Lightning writes that file only once, before anything is logged: rewritten here)."""
    from lightning.pytorch.core.saving import save_hparams_to_yaml

    logger.log_hyperparams(combination_hparams(combo, num_vision), {f"metrics/{k}": v for k, v in metrics.items()},
                           step=0)
    save_hparams_to_yaml(Path(logger.log_dir) / "hparams.yaml", logger.hparams)
