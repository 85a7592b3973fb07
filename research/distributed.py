"""Several devices through Lightning: data-parallel combinations (``trainer.devices=N``, on ``trainer.num_nodes=M``
machines) and sharded checkpoints (``model.device_map=auto``).

Several machines: Lightning's multi-node DDP, every node running the same ``python -m research.run ...`` under
torchrun or SLURM (:func:`trainer_options`); the ranks then come from the launcher and Lightning starts no copies.

Data-parallel: each combination's predict loop runs under Lightning's DDP strategy (``gloo`` on CPU). Its first
``trainer.predict`` makes Lightning's launcher start N-1 more copies of the command (``python -m research.run
...``, rank 1..N-1 in ``LOCAL_RANK``); every copy runs the same sweep in lockstep, so every rank makes the same
trainer calls. The samples are cut into the batches a single process would run (so a seeded scorer draws the same
tokens for the same rows whatever N is) and :class:`RankShare` deals those batches out to the ranks as Lightning's
unrepeated sampler would, except that a rank's share may be empty (fewer batches than ranks). After the loop every
rank's predictions are gathered, each sample counted once by its index (a sampler that pads with repeats adds
nothing), and rank 0 alone computes the metrics, times latency and writes predictions, results, summaries and
TensorBoard; the metrics (or the error) are then broadcast, so every rank records the same outcome.

Every rank runs the same collectives whatever its share: Lightning skips the loop's hooks on a rank with no batch,
and an error outside ``predict_step`` ends the loop early, so :func:`predict_in_step` runs the gather and the
broadcast after ``trainer.predict`` on a rank that has not run them yet.

A rank that is gone: the copies watch rank 0, their parent (:func:`watch_rank_zero`), and stop within a second of
its death with one line; rank 0 is ended by Lightning's launcher when a copy dies (its line is let through). A
collective that fails (a peer closed its connection, or :data:`COLLECTIVE_TIMEOUT` passed) ends the run with one
line on each rank left, rather than being recorded as one combination's failure while the ranks are out of step.

Sharded: ``model.device_map`` loads the checkpoint through transformers with accelerate's device map; the model
is then held outside the LightningModule's parameters, so Lightning does not move it to one device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Sampler

from research.storage import StopSweep

# How long a rank waits in one collective before the run ends. Dead ranks are noticed within seconds without it
# (rank 0's death by the copies' watch, a copy's death by Lightning's launcher), so this only ends a group that is
# alive but stuck, and must outlast the longest wait of a sound run: rank 0 waits at the first rendezvous while a
# copy loads the checkpoint and calibrates (minutes for a large model), and the copies wait at each combination's
# broadcast while rank 0 times latency, runs the attention analysis and writes TensorBoard (minutes on a GPU).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
RANK_ZERO_PID = "VTPRUNE_RANK_ZERO_PID"  # set by rank 0 before Lightning starts the copies, which inherit it
LAUNCHER_LOGGER = "lightning.fabric.strategies.launchers.subprocess_script"  # "Child process ... terminated"
_stopping = threading.Lock()  # one line per rank, even if the watch and a failed collective both notice


def is_rank_zero() -> bool:
    """True in the launching process (and in a single-process run); False in the copies Lightning started."""
    return rank_zero_only.rank == 0


def say(text: str) -> None:
    """Print on rank 0 only (the other ranks run the same sweep silently)."""
    if is_rank_zero():
        print(text, flush=True)


def trainer_options(devices: int, accelerator: str, num_nodes: int | None = None) -> dict[str, Any]:
    """``L.Trainer`` keyword arguments: one device, or DDP over ``devices`` processes on each of ``num_nodes``
    machines (Lightning picks ``gloo`` on CPU, ``nccl`` on CUDA) with :class:`RankShare` in place of Lightning's
    sampler. ``num_nodes`` None: the launcher's count (:func:`launcher_nodes`). On rank 0 this also exports its
    pid for the copies' :func:`watch_rank_zero`.

    Several nodes: every node runs the same command, started by torchrun (``--nnodes M --node_rank R
    --nproc_per_node N``) or by SLURM (``srun``, one task per device); Lightning reads the ranks from their
    environment and starts no copies itself."""
    nodes = launcher_nodes() if num_nodes is None else num_nodes
    if devices == 1 and nodes == 1:
        return {"accelerator": accelerator, "devices": 1, "num_nodes": 1}
    if is_rank_zero():
        os.environ[RANK_ZERO_PID] = str(os.getpid())
        logging.getLogger(LAUNCHER_LOGGER).setLevel(logging.INFO)  # its one line when it ends the ranks
    return {"accelerator": accelerator, "devices": devices, "num_nodes": nodes,
            "strategy": InStepDDP(timeout=COLLECTIVE_TIMEOUT), "use_distributed_sampler": False}


def launcher_nodes() -> int:
    """The number of nodes of the launch this process is part of: torchrun's ``WORLD_SIZE / LOCAL_WORLD_SIZE``,
    SLURM's ``SLURM_NNODES`` (as Lightning detects either), else 1."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() and "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]))
    if SLURMEnvironment.detect() and "SLURM_NNODES" in os.environ:
        return int(os.environ["SLURM_NNODES"])
    return 1


def stop_rank(line: str) -> None:
    """Print ``line`` (prefixed with this rank) and end this process with status 1, at once: a copy holds no
    output files, and its peers cannot go on without it."""
    with _stopping:
        print(f"rank {rank_zero_only.rank}: {line}", file=sys.stderr, flush=True)
        os._exit(1)


def rank_zero_gone(grace: float = 0.0) -> bool:
    """In a copy Lightning started: whether rank 0, its parent, has died (within ``grace`` seconds)."""
    launcher = os.environ.get(RANK_ZERO_PID)
    if launcher is None or is_rank_zero():
        return False
    deadline = time.monotonic() + grace
    while os.getppid() == int(launcher):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def watch_rank_zero(period: float = 0.5) -> None:
    """In a copy Lightning started (ranks 1..N-1): a daemon thread that stops this rank with one line once rank 0,
    its parent, has died, wherever the rank is (loading the model, in a rendezvous or a collective)."""
    if os.environ.get(RANK_ZERO_PID) is None or is_rank_zero():
        return

    def watch() -> None:
        while not rank_zero_gone():
            time.sleep(period)
        stop_rank(f"rank 0 (pid {os.environ[RANK_ZERO_PID]}) is gone; stopping")

    threading.Thread(target=watch, name="watch-rank-zero", daemon=True).start()


def _copies_gone(strategy: Any, grace: float) -> list[str]:
    """On rank 0: ``rank R is gone (exit code C)`` for each copy Lightning started that has ended (within
    ``grace``)."""
    procs = getattr(strategy.launcher, "procs", [])
    deadline = time.monotonic() + grace
    while True:
        gone = [f"rank {rank} is gone (exit code {proc.returncode})" for rank, proc in enumerate(procs, 1)
                if proc.poll() is not None]
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


@contextlib.contextmanager
def collective(strategy: Any) -> Iterator[None]:
    """Around a collective: its failure ends the run (one line per rank) instead of one combination, since the
    ranks can no longer stay in step. On rank 0 a :class:`StopSweep` naming the rank that is gone; a copy stops."""
    try:
        yield
    except StopSweep:
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        if not is_rank_zero():
            if rank_zero_gone(grace=2.0):
                stop_rank(f"rank 0 (pid {os.environ[RANK_ZERO_PID]}) is gone; stopping")
            stop_rank(f"a collective failed ({reason}); stopping")
        gone = _copies_gone(strategy, grace=2.0)
        raise StopSweep("; ".join(gone) if gone else f"a collective failed ({reason})") from error


class InStepDDP(DDPStrategy):
    """Lightning's DDP strategy whose collectives (rendezvous, barriers, broadcasts) end the run when they fail
    (:func:`collective`)."""

    def setup_distributed(self) -> None:
        with collective(self):
            super().setup_distributed()

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        with collective(self):
            super().barrier(*args, **kwargs)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with collective(self):
            return super().broadcast(obj, src)


class RankShare(Sampler[int]):
    """This rank's batches of ``count``: every world-size-th from its rank, as Lightning's unrepeated sampler deals
    them, but an empty share (fewer batches than ranks) is allowed. Read from ``trainer`` when the loop starts
    (its ranks are set by then)."""

    def __init__(self, count: int, trainer: Any) -> None:
        self.count, self.trainer = count, trainer

    def _indices(self) -> range:
        return range(self.trainer.global_rank, self.count, self.trainer.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def batch_loader(samples: Sequence[Any], batch_size: int, trainer: Any) -> DataLoader:
    """The batches one process would run (:func:`batches`), this rank's share of them (:class:`RankShare`)."""
    made = batches(samples, batch_size)
    return DataLoader(made, batch_size=None, sampler=RankShare(len(made), trainer), collate_fn=keep_batch)


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
        with collective(trainer.strategy):
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
    failed combination and stay in step for the next one. A rank whose loop never reached ``on_predict_end``
    shares its part through :meth:`share` after the loop (:func:`predict_in_step`).
    """

    def __init__(self, reports: list[Callback]) -> None:
        super().__init__()
        self.reports = reports
        self.start = time.perf_counter()
        self.shared = False  # whether this rank has started the gather and broadcast of this loop

    def on_predict_start(self, trainer: Any, module: Any) -> None:
        self.start = time.perf_counter()

    def on_predict_end(self, trainer: Any, module: Any) -> None:
        self.share(trainer, module, run_reports=True)

    def share(self, trainer: Any, module: Any, run_reports: bool) -> None:
        """Gather, run the reports on rank 0 (if ``run_reports`` and no rank met an error), broadcast."""
        self.shared = True
        module.eval_seconds = time.perf_counter() - self.start
        errors = gather_predictions(trainer, module)
        outcome: tuple[str, Any] = ("ok", {})
        raised: BaseException | None = None
        if trainer.is_global_zero:
            try:
                if errors:
                    rank, message = errors[0]
                    raise module.error if rank == trainer.global_rank else RuntimeError(f"rank {rank}: {message}")
                for report in self.reports if run_reports else []:
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


def predict_in_step(trainer: Any, module: Any, loader: DataLoader, report: RankZeroReport) -> None:
    """``trainer.predict`` with ``report`` among its callbacks, then ``report.share`` on a rank whose loop ended
    before it: one with no batch (Lightning skips the loop and its hooks) or one that met an error outside
    ``predict_step`` (kept as the rank's error, raised on every rank). So every rank runs the same collectives."""
    module.allow_zero_length_dataloader_with_multiple_devices = True  # Lightning's switch for an empty share
    try:
        trainer.predict(module, loader, return_predictions=False)
    except StopSweep:
        raise
    except Exception as error:
        if report.shared:
            raise
        if module.error is None:
            module.error, module.error_message = error, f"{type(error).__name__}: {error}".splitlines()[0]
    if not report.shared:
        report.share(trainer, module, run_reports=False)


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
