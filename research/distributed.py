"""Several devices through Lightning: data-parallel combinations (``trainer.devices=N``) and sharded checkpoints
(``model.device_map=auto``).

Data-parallel: each combination's predict loop runs under Lightning's DDP strategy (``gloo`` on CPU). Its first
``trainer.predict`` makes Lightning's launcher start N-1 more copies of the command (``python -m research.run
...``, rank 1..N-1 in ``LOCAL_RANK``); every copy runs the same sweep in lockstep, so every rank makes the same
trainer calls. The samples are cut into the batches a single process would run (so a seeded scorer draws the same
tokens for the same rows whatever N is) and Lightning's distributed sampler deals those batches out to the ranks.
After the loop every rank's predictions are gathered, each sample counted once by its index (a sampler that pads
with repeats adds nothing), and rank 0 alone computes the metrics, times latency and writes predictions, results,
summaries and TensorBoard; the metrics (or the error) are then broadcast, so every rank records the same outcome.

Sharded: ``model.device_map`` loads the checkpoint through transformers with accelerate's device map; the model
is then held outside the LightningModule's parameters, so Lightning does not move it to one device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from research.storage import StopSweep


def is_rank_zero() -> bool:
    """True in the launching process (and in a single-process run); False in the copies Lightning started."""
    return rank_zero_only.rank == 0


def say(text: str) -> None:
    """Print on rank 0 only (the other ranks run the same sweep silently)."""
    if is_rank_zero():
        print(text, flush=True)


def trainer_options(devices: int, accelerator: str) -> dict[str, Any]:
    """``L.Trainer`` keyword arguments: one device, or DDP over ``devices`` processes (Lightning picks ``gloo``
    on CPU, ``nccl`` on CUDA)."""
    if devices == 1:
        return {"accelerator": accelerator, "devices": 1}
    return {"accelerator": accelerator, "devices": devices, "strategy": "ddp"}


def batches(samples: Sequence[Any], batch_size: int) -> list[list[tuple[int, Any]]]:
    """The batches one process would run, each a list of (index in ``samples``, sample)."""
    indexed = list(enumerate(samples))
    return [indexed[start:start + batch_size] for start in range(0, len(indexed), batch_size)]


def keep_batch(batch: Any) -> Any:
    """The DataLoader's ``collate_fn`` for pre-made batches (``batch_size=None``): the batch as it is."""
    return batch


def gather_predictions(trainer: Any, module: Any) -> list[tuple[int, str]]:
    """Every rank's prediction rows into ``module.rows``, each sample once (by ``row["index"]``, in index order),
    and every rank's undecodable images into ``module.skipped``; returns the errors ``(rank, message)`` of the
    ranks that met one."""
    mine = (module.rows, module.skipped, module.error_message)
    if trainer.world_size > 1:
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    unique: dict[int, dict] = {}
    for rows, _, _ in gathered:
        for row in rows:
            unique.setdefault(row["index"], row)
    module.rows = [unique[index] for index in sorted(unique)]
    module.skipped = sorted({sample_id for _, skipped, _ in gathered for sample_id in skipped})
    return [(rank, message) for rank, (_, _, message) in enumerate(gathered) if message]


class RankZeroReport(Callback):
    """After a combination's predict loop, on every rank: gather the predictions, run ``reports`` (callbacks whose
    ``on_predict_end`` computes metrics and writes files) on rank 0 only, and share their outcome.

    Sets ``module.eval_seconds`` (the predict loop's wall time on this rank), ``module.rows`` and
    ``module.skipped`` (all ranks') and ``module.metrics`` (rank 0's, on every rank). An error on any rank, in a
    batch or in a report, is raised on every rank (a :class:`StopSweep` stays one), so all ranks record the same
    failed combination and stay in step for the next one.
    """

    def __init__(self, reports: list[Callback]) -> None:
        super().__init__()
        self.reports = reports
        self.start = 0.0

    def on_predict_start(self, trainer: Any, module: Any) -> None:
        self.start = time.perf_counter()

    def on_predict_end(self, trainer: Any, module: Any) -> None:
        module.eval_seconds = time.perf_counter() - self.start
        errors = gather_predictions(trainer, module)
        outcome: tuple[str, Any] = ("ok", {})
        raised: BaseException | None = None
        if trainer.is_global_zero:
            try:
                if errors:
                    rank, message = errors[0]
                    raise module.error if rank == trainer.global_rank else RuntimeError(f"rank {rank}: {message}")
                for report in self.reports:
                    report.on_predict_end(trainer, module)
                outcome = ("ok", module.metrics)
            except StopSweep as error:
                outcome, raised = ("stop", str(error)), error
            except Exception as error:  # recorded as the combination's failure, on every rank
                outcome, raised = ("failed", f"{type(error).__name__}: {error}".splitlines()[0]), error
        outcome = trainer.strategy.broadcast(outcome, src=0)
        if raised is not None:
            raise raised
        if outcome[0] == "stop":
            raise StopSweep(outcome[1])
        if outcome[0] == "failed":
            raise RuntimeError(outcome[1])
        module.metrics = outcome[1]


def load_sharded(adapter_class: Any, directory: Path, dtype: torch.dtype, attn_implementation: str,
                 device_map: str) -> tuple[Any, Any]:
    """(adapter, processor) of a checkpoint of ``adapter_class``'s family loaded with accelerate's ``device_map``
    (shards over the visible devices); the same left-padding processor as ``adapter_class.from_pretrained``."""
    from transformers import AutoProcessor

    model = adapter_class.model_type().from_pretrained(
        directory, local_files_only=True, dtype=dtype, attn_implementation=attn_implementation, device_map=device_map,
        trust_remote_code=False,
    ).eval()
    processor = AutoProcessor.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    return adapter_class(model), processor
