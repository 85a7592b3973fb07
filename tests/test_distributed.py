"""Several devices through Lightning: ``trainer.devices=2`` (DDP, gloo on CPU) gives the single-process summary,
and every sample is counted exactly once, also when a rank has no batch; a rank whose peer died stops with one
line."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny import TIMING_COLUMNS

from research.config import ConfigError, load_config
from research.distributed import (
    RANK_ZERO_PID,
    RankShare,
    batches,
    collective,
    gather_predictions,
    launcher_nodes,
    trainer_options,
)
from research.run import run
from research.storage import StopSweep

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["experiment=main_table", "scorers=[text_prior,random]", "budgets=[32]", "data.limit=7", "eval.batch_size=2",
         "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=1", "eval.analysis_samples=3"]


def _summary(out: Path) -> list[dict]:
    with (out / "main_table" / "summary.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def _predictions(out: Path) -> dict[str, list[dict]]:
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((out / "main_table" / "predictions").glob("*.jsonl"))}


def _start_ranks(args: list[str]) -> subprocess.Popen:
    """``python -m research.run *args`` (rank 0, which starts the other ranks) in a session of its own, so a test
    can end every rank it left behind."""
    return subprocess.Popen([sys.executable, "-m", "research.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)


def _end_session(rank_zero: subprocess.Popen) -> None:
    """Kill whatever is left of the ranks (rank 0's session)."""
    try:
        os.killpg(rank_zero.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    rank_zero.wait()


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_two_processes_give_the_single_process_summary_and_each_sample_once(micro_model, tmp_path):
    common = [*SMALL, f"model.path={micro_model}"]
    run(load_config([*common, f"output_dir={tmp_path / 'one'}"]))
    two = subprocess.run(
        [sys.executable, "-m", "research.run", *common, f"output_dir={tmp_path / 'two'}", "trainer.devices=2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("full table in") == 1  # rank 1 prints nothing
    # 7 samples in 4 batches of 2: Lightning's sampler gives each rank 2 batches (one rank 3 samples, one 4).
    assert _summary(tmp_path / "two") == _summary(tmp_path / "one")  # accuracy, ratios, dynamics, status
    single, parallel = _predictions(tmp_path / "one"), _predictions(tmp_path / "two")
    assert list(parallel) == ["random__layers1-10-20_of32__b32.jsonl", "text_prior__layers1-10-20_of32__b32.jsonl",
                              "vanilla.jsonl"]
    for name, rows in parallel.items():
        assert [r["index"] for r in rows] == list(range(7)), name  # each sample exactly once, in order
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in single[name]], name
    vanilla = tmp_path / "two" / "main_table" / "tensorboard" / "vanilla"
    files = [p.name for p in vanilla.glob("events.out.tfevents.*")]  # one writer, rank 0's: its run and, from the
    assert sorted(f.endswith(".statistics") for f in files) == [False, True]  # summary, the run's statistics


@pytest.mark.slow
def test_two_processes_with_one_batch_give_the_single_process_summary(micro_model, tmp_path):
    """One batch for two ranks: rank 1's share is empty, yet both ranks run the same collectives and finish."""
    common = [*SMALL, f"model.path={micro_model}", "scorers=[random]", "data.limit=3", "eval.batch_size=100"]
    run(load_config([*common, f"output_dir={tmp_path / 'one'}"]))
    two = _start_ranks([*common, f"output_dir={tmp_path / 'two'}", "trainer.devices=2"])
    try:
        output, _ = two.communicate(timeout=300)
    finally:
        _end_session(two)
    assert two.returncode == 0, output[-3000:]
    assert output.count("full table in") == 1
    assert _summary(tmp_path / "two") == _summary(tmp_path / "one")
    for name, rows in _predictions(tmp_path / "two").items():
        assert [r["index"] for r in rows] == [0, 1, 2], name


@pytest.mark.slow
def test_rank_one_exits_with_one_line_when_rank_zero_is_killed(micro_model, tmp_path):
    """Rank 0 killed (SIGKILL) right after it started rank 1: rank 1 stops within 60 s, printing one line."""
    rank_zero = _start_ranks([*SMALL, f"model.path={micro_model}", f"output_dir={tmp_path}", "trainer.devices=2"])
    try:
        deadline = time.monotonic() + 240
        while not (others := _children(rank_zero.pid)) and rank_zero.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(others) == 1, f"rank 1 not started: {rank_zero.poll()=}"
        time.sleep(3)  # rank 1 is starting up (imports, model load) when rank 0 dies
        rank_zero.kill()
        killed = time.monotonic()
        output, _ = rank_zero.communicate(timeout=60)  # the output pipe closes once rank 1 has exited too
        waited = time.monotonic() - killed
    finally:
        _end_session(rank_zero)
    gone = [line for line in output.splitlines() if "is gone" in line]
    assert gone == [f"rank 1: rank 0 (pid {rank_zero.pid}) is gone; stopping"], output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert waited < 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun_node(node_rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One "node" of a 2-node x 1-process torchrun launch on 127.0.0.1 (static rendezvous), running
    ``python -m research.run *args``, in a session of its own."""
    launch = ["-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", "1",
              "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return subprocess.Popen([sys.executable, *launch, "-m", "research.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)


@pytest.mark.slow
def test_two_nodes_under_torchrun_give_the_single_process_summary_and_each_sample_once(micro_model, tmp_path):
    """``trainer.num_nodes=2``: Lightning's multi-node DDP as torchrun launches it (2 nodes x 1 process here)."""
    common = [*SMALL, f"model.path={micro_model}", "scorers=[text_prior]"]
    run(load_config([*common, f"output_dir={tmp_path / 'one'}"]))
    port, args = _free_port(), [*common, f"output_dir={tmp_path / 'two'}", "trainer.num_nodes=2"]
    nodes = [_torchrun_node(rank, port, args) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            _end_session(node)
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert outputs[0].count("full table in") == 1 and "full table in" not in outputs[1]  # node 1 prints nothing
    assert _summary(tmp_path / "two") == _summary(tmp_path / "one")
    single, parallel = _predictions(tmp_path / "one"), _predictions(tmp_path / "two")
    assert list(parallel) == list(single) == ["text_prior__layers1-10-20_of32__b32.jsonl", "vanilla.jsonl"]
    for name, rows in parallel.items():
        assert [r["index"] for r in rows] == list(range(7)), name  # each sample exactly once, in order
        assert [r["prediction"] for r in rows] == [r["prediction"] for r in single[name]], name


def test_num_nodes_reaches_lightning_with_ddp_and_the_launcher_count_is_the_default(monkeypatch):
    options = trainer_options(1, "cpu", num_nodes=2)
    assert options["num_nodes"] == 2 and options["devices"] == 1 and type(options["strategy"]).__name__ == "InStepDDP"
    assert trainer_options(1, "cpu", num_nodes=1) == {"accelerator": "cpu", "devices": 1, "num_nodes": 1}
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_nodes() == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun --nnodes 3 --nproc_per_node 2
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert launcher_nodes() == 3


def test_gathered_predictions_count_a_repeated_sample_once():
    """A sampler that pads with repeats (torch's DistributedSampler) hands a sample to two ranks: it counts once."""
    rank_rows = [{"index": 0, "prediction": "a"}, {"index": 2, "prediction": "c"}, {"index": 0, "prediction": "a"}]
    module = SimpleNamespace(rows=rank_rows + [{"index": 1, "prediction": "b"}], skipped=["x", "x"],
                             error_message=None)
    assert gather_predictions(SimpleNamespace(world_size=1), module) == []
    assert [r["index"] for r in module.rows] == [0, 1, 2] and module.skipped == ["x"]


def test_batches_are_the_single_process_batches_with_sample_indices():
    assert batches(["a", "b", "c", "d", "e"], 2) == [[(0, "a"), (1, "b")], [(2, "c"), (3, "d")], [(4, "e")]]


@pytest.mark.parametrize("count, rank, share", [(5, 0, [0, 2, 4]), (5, 1, [1, 3]), (1, 0, [0]), (1, 1, [])])
def test_rank_share_deals_batches_like_lightning_and_may_be_empty(count, rank, share):
    """Two ranks: every other batch from the rank's own; with one batch rank 1 has none (Lightning's sampler
    asserts there)."""
    sampler = RankShare(count, SimpleNamespace(global_rank=rank, world_size=2))
    assert list(sampler) == share and len(sampler) == len(share)


def test_a_failed_collective_on_rank_zero_stops_the_sweep_naming_the_rank_that_is_gone():
    """Rank 0 in a collective whose peer died: one StopSweep line naming the copy (not one failed combination)."""
    dead = subprocess.Popen([sys.executable, "-c", "import os; os._exit(3)"])
    dead.wait()
    with pytest.raises(StopSweep, match=r"^rank 1 is gone \(exit code 3\)$"):
        with collective(SimpleNamespace(launcher=SimpleNamespace(procs=[dead]))):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")


def test_a_failed_collective_on_a_copy_stops_it_with_one_line(monkeypatch, capsys):
    """A copy whose collective timed out while rank 0 lives: one line, status 1 (``os._exit``: nothing to keep)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setenv(RANK_ZERO_PID, str(os.getppid()))  # "rank 0": this test's parent, alive

    def exit_now(status: int) -> None:
        raise SystemExit(status)

    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(SystemExit, match="1"):
        with collective(SimpleNamespace(launcher=None)):
            raise RuntimeError("Timed out waiting 1800000ms for recv operation to complete\nmore")
    assert capsys.readouterr().err == ("rank 1: a collective failed (RuntimeError: Timed out waiting 1800000ms for "
                                       "recv operation to complete); stopping\n")


@pytest.mark.parametrize("extra, message", [
    (["trainer.devices=0"], "trainer.devices=0 out of range"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0 out of range; valid: an integer >= 1"),
    (["model.device_map=everywhere"], "unknown model.device_map 'everywhere'"),
])
def test_bad_device_settings_are_one_line(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["experiment=main_table", *extra])


def test_device_map_needs_accelerate_and_one_copy_of_the_model(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def accelerate_found(found: object | None):
        return lambda name, *args: found if name == "accelerate" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", accelerate_found(None))
    with pytest.raises(ConfigError, match=r"needs accelerate: pip install -e '\.\[sharding\]'"):
        load_config(["experiment=main_table", "model.device_map=auto"])
    monkeypatch.setattr(importlib.util, "find_spec", accelerate_found(object()))
    with pytest.raises(ConfigError, match="does not combine with trainer.devices=2"):
        load_config(["experiment=main_table", "model.device_map=auto", "trainer.devices=2"])
