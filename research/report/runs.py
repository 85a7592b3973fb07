"""TensorBoard runs of a sweep: one per combination (named by its label), its HParams session, its failure trace, and
replacing a run that is logged again (so each value is there once)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from research.combination import Combination
from research.report.labels import combination_labels, legacy_run_name


def combo_label(combo: Combination) -> str:
    """The combination's label (research.report.labels) as the progress bar, the terminal and the summary name it:
    ``combo.label`` (set by plan_sweep), or the label it has alone when it was built by hand."""
    return combo.label or combination_labels([combo])[combo.name]


def run_name(combo: Combination) -> str:
    """The combination's TensorBoard run: its label (``layers[1-10-20_of32]/text_prior/64``, ``vanilla``).

    Its parts are nested directories, so ``tensorboard --logdir <output_dir>/<experiment>/tensorboard`` names the
    run by the label itself; the file names under ``results/`` and ``predictions/`` keep ``combo.name``.
    """
    return combo_label(combo)


def run_path(combo: Combination, folder: str = "") -> str:
    """The run's directory relative to ``tensorboard/`` (``<benchmark>/<label>`` over several benchmarks): what a
    result records as its ``run``."""
    return f"{folder}/{run_name(combo)}" if folder else run_name(combo)


def earlier_run(result: dict, combo: Combination, folder: str = "") -> str:
    """Where a finished result's run was logged: its ``run``, or for a result written before results named their
    run, the name runs had then (research.report.labels.legacy_run_name)."""
    if result.get("run"):
        return result["run"]
    legacy = legacy_run_name(combo)
    return f"{folder}/{legacy}" if folder else legacy


def move_run(board: Path, old: str, new: str) -> bool:
    """Move the run ``board/old`` to ``board/new`` (a reused result's run, logged under an earlier name), removing
    the folders left empty; True when the names differ (the result then records ``new``)."""
    if old == new:
        return False
    source, target = board / old, board / new
    if source.is_dir() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        for parent in source.parents:
            if parent == board or not parent.is_relative_to(board) or any(parent.iterdir()):
                break
            parent.rmdir()
    return True


def run_logger(out: Path, combo: Combination, folder: str = "") -> TensorBoardLogger:
    """The TensorBoard logger of one combination: its run directory ``<out>/tensorboard/<run_name(combo)>``
    (``<out>/tensorboard/<benchmark>/<run_name(combo)>`` in a sweep over several benchmarks)."""
    return TensorBoardLogger(save_dir=out, name="tensorboard", version=run_path(combo, folder),
                             default_hp_metric=False)


def run_directory(out: Path, combo: Combination, folder: str = "") -> Path:
    """The directory of :func:`run_logger`'s run."""
    return out / "tensorboard" / folder / run_name(combo)


def log_failure(out: Path, combo: Combination, num_vision: int, error: str, folder: str = "") -> None:
    """A failed combination's trace in its TensorBoard run: the text ``status`` with the error, the scalar
    ``metrics/failed`` = 1 and its HParams session, ended as failed (so the failure shows in the HParams table)."""
    try:
        logger = run_logger(out, combo, folder)
        logger.experiment.add_text("status", f"failed: {error}", 0)
        log_hparams(logger, combo, num_vision, {"failed": 1}, failed=True)
        logger.finalize("failed")
    except OSError as failure:  # the trace is a courtesy: the result file and summary still record the failure
        logging.getLogger(__name__).warning("cannot log the failure of %s to TensorBoard: %s", combo.name, failure)


def remove_run(path: Path) -> None:
    """Remove the TensorBoard run at ``path`` before it is logged again, so it holds each value once even after a
    killed or an earlier run logged into it (rank 0 only: :meth:`research.output.SweepOutput.replace_run`)."""
    shutil.rmtree(path, ignore_errors=True)


def combination_hparams(combo: Combination, num_vision: int) -> dict[str, Any]:
    """The HParams-table columns of a combination: its label (``combination``), scorer, schedule, budget, layers,
    keep, positions and the scorer's and schedule's own parameters (``scorer.<name>``, ``schedule.<name>``, as
    strings)."""
    hparams: dict[str, Any] = {
        "combination": combo_label(combo), "scorer": combo.scorer_label, "schedule": combo.schedule,
        "budget": combo.budget or float(num_vision), "layers": str(combo.locations), "keep": str(combo.keep),
        "positions": combo.positions,
    }
    for prefix, params in (("scorer", combo.scorer_params), ("schedule", combo.schedule_params)):
        for name, value in sorted(params.items()):
            hparams[f"{prefix}.{name}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    return hparams


def log_hparams(logger: Any, combo: Combination, num_vision: int, metrics: dict[str, float],
                failed: bool = False) -> None:
    """The combination's HParams session (its hparams, then its end with status success or failure), ``metrics``
    written once as the scalars ``metrics/<name>`` and its ``hparams.yaml``. No experiment summary: the
    ``summary`` run holds the one of the whole sweep (research.report.board), since TensorBoard reads the first
    it finds and would otherwise show one run's parameters only."""
    from lightning.pytorch.core.saving import save_hparams_to_yaml
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG
    from tensorboard.plugins.hparams.summary_v2 import hparams_pb

    hparams = combination_hparams(combo, num_vision)
    writer = logger.experiment
    writer.file_writer.add_summary(hparams_pb(hparams, trial_id=hparams["combination"]))
    for name, value in metrics.items():
        writer.add_scalar(f"metrics/{name}", value, 0)
    status = api_pb2.Status.STATUS_FAILURE if failed else api_pb2.Status.STATUS_SUCCESS
    end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=status))
    writer.file_writer.add_summary(hparams_summary(SESSION_END_INFO_TAG, end))
    writer.flush()
    Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
    save_hparams_to_yaml(Path(logger.log_dir) / "hparams.yaml", hparams)


def hparams_summary(tag: str, plugin_data: Any) -> Any:
    """A summary holding HParams plugin data (what ``tensorboard.plugins.hparams.summary_v2`` writes for its own;
    its session-end and experiment writers need TensorFlow, which this project does not install)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)
    return summary
