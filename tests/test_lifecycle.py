"""A run's life: stop signals (SIGTERM, SIGINT), kills at chosen instants, the rerun after them, and the lock.

The runs that get a signal or are killed are subprocesses (``python -m research.run``) on the micro LLaVA of
conftest.py with a few samples; the code that decides the instant comes in through ``imports=[...]``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from research.config import load_config
from research.run import run

FAST = ["data.limit=6", "eval.batch_size=3", "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=1",
        "eval.analysis_samples=3"]


@pytest.fixture
def experiment(tmp_path) -> Path:
    path = tmp_path / "life.yaml"
    path.write_text(textwrap.dedent("""\
        scorers: [random]
        schedules: [{name: changepoint, samples: 4}, {name: layers, layers: [0, 2]}]
        budgets: [100]
        """))
    return path


def args(experiment: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [f"experiment={experiment}", f"model.path={model}", f"output_dir={out}", *FAST, *extra]


def user_module(tmp_path: Path, name: str, source: str) -> dict[str, str]:
    """Write ``<tmp>/pkg/<name>.py``; the environment that lets a subprocess import it."""
    package = tmp_path / "pkg"
    package.mkdir(exist_ok=True)
    (package / f"{name}.py").write_text(textwrap.dedent(source))
    return {**os.environ, "PYTHONPATH": f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "research.run", *arguments]


WAITING_SCORER = """\
    import time
    from dataclasses import dataclass
    from pathlib import Path
    from scorers import SCORERS, Scorer

    @SCORERS.register("waits")
    @dataclass
    class Waits(Scorer):
        def score(self, signals):
            Path({started!r}).touch()
            while not Path({release!r}).exists():
                time.sleep(0.05)
            return signals.t2v.sum(1)
    """


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "devices"), [(signal.SIGTERM, 1), (signal.SIGINT, 2)],
                         ids=["SIGTERM", "SIGINT-2-processes"])
def test_a_stop_signal_mid_combination_stops_within_seconds_keeps_what_finished_and_the_rerun_resumes(
        micro_model, experiment, tmp_path, monkeypatch, capsys, signum, devices):
    """The signal goes to the run's process group, as ``timeout``, SLURM and Ctrl-C send it (under
    ``trainer.devices=2`` that is both ranks)."""
    started, release = tmp_path / "started", tmp_path / "release"
    env = user_module(tmp_path, "waiting_scorer", WAITING_SCORER.format(started=str(started), release=str(release)))
    out = tmp_path / "runs"
    sweep = args(experiment, micro_model, out, "imports=[waiting_scorer]", "scorers=[waits]",
                 "schedules=[{name: layers, layers: [0, 2]}]", f"trainer.devices={devices}")
    process = subprocess.Popen(command(*sweep), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not started.exists():  # vanilla finished; the scorer's combination is in its predict loop
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        os.killpg(process.pid, signum)
        code = process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while group_alive(process.pid):  # every rank ends too
            assert time.monotonic() < deadline, "a rank is still running 10 s after rank 0 ended"
            time.sleep(0.1)
    finally:
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
    stdout, stderr = process.communicate()
    assert code == 128 + signum, (code, stderr[-2000:])
    name = signal.Signals(signum).name
    said = [line for line in (stdout + stderr).splitlines()
            if any(word in line for word in ("stop", "SIG", "Traceback", "Interrupt", "rror"))]
    assert said == [f"stopped by {name}: 1 of 2 combinations finished (kept in {out / 'life' / 'results'}); "
                    "run the same command again to resume"], stderr[-2000:]
    experiment_dir = out / "life"
    assert sorted(p.name for p in (experiment_dir / "results").iterdir()) == ["vanilla.json"]
    assert sorted(p.name for p in (experiment_dir / "predictions").iterdir()) == ["vanilla.jsonl"]
    assert not [p for p in experiment_dir.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert not [p for p in (experiment_dir / "tensorboard" / "waits").rglob("*") if p.is_file()]  # nor its run
    with (experiment_dir / ".lock").open() as lock:  # released
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)

    if devices == 1:  # the same command again reuses vanilla and runs the stopped combination
        release.touch()
        monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
        rows = run(load_config(sweep))
        assert "reusing 1 finished combination(s), running 1" in capsys.readouterr().out
        assert [r["status"] for r in rows] == ["ok", "ok"]


KILLER = """\
    import os
    import signal
    from pathlib import Path

    import research.evaluation as evaluation

    WHERE, _, COUNT = os.environ["KILL_AT"].partition(":")  # result:N (inside the N-th result's rename) or batch:1
    seen = []
    real_replace, real_step = os.replace, evaluation.CombinationModule.predict_step

    def replace(source, destination, **kwargs):
        if WHERE == "result" and Path(destination).parent.name == "results":
            seen.append(destination)
            if len(seen) == int(COUNT):  # its temporary file is written, the rename not done
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(source, destination, **kwargs)

    def predict_step(self, batch, batch_idx):
        if WHERE == "batch" and batch_idx == int(COUNT):  # mid-combination, after its first batch
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, batch, batch_idx)

    os.replace = replace
    evaluation.CombinationModule.predict_step = predict_step
    """


def events(run_dir: Path) -> EventAccumulator:
    """Every event of every events file in ``run_dir`` (none purged: a duplicate shows as one)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0},
                                   purge_orphaned_data=False)
    accumulator.Reload()
    return accumulator


@pytest.mark.slow
def test_after_kills_the_rerun_leaves_no_temporary_file_and_tensorboard_holds_each_value_once(
        micro_model, experiment, tmp_path):
    env = user_module(tmp_path, "killer", KILLER)
    out = tmp_path / "runs"
    sweep = args(experiment, micro_model, out)
    experiment_dir = out / "life"
    for kill_at in ("result:2", "batch:1"):  # the 2nd combination killed at its end, then mid-way in its rerun
        killed = subprocess.run(command(*sweep, "imports=[killer]"), capture_output=True, text=True, timeout=300,
                                env={**env, "KILL_AT": kill_at})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        if kill_at.startswith("result"):  # killed inside write_atomic: its temporary file is there
            assert list((experiment_dir / "results").glob(".*.tmp"))
    rows = run(load_config(sweep))
    assert [r["status"] for r in rows] == ["ok"] * 3
    run(load_config(sweep))  # every combination reused

    assert not [p for p in experiment_dir.rglob("*") if p.name.endswith(".tmp")]
    board = experiment_dir / "tensorboard"
    run_dirs = sorted({p.parent for p in board.rglob("events.out.tfevents.*")})
    names = [str(d.relative_to(board)) for d in run_dirs]
    assert names == ["calibration", "changepoint(samples=4)@val/random/100", "layers[0-2]/random/100", "summary",
                     "vanilla"]
    for run_dir in run_dirs:
        files = sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))
        statistics = [name for name in files if name.endswith(".statistics")]  # the summary's, replaced each time
        assert len(files) - len(statistics) == 1 and len(statistics) <= 1, (run_dir.name, files)  # no stub
        logged = events(run_dir)
        for kind, read in (("scalars", logged.Scalars), ("images", logged.Images), ("tensors", logged.Tensors)):
            for tag in logged.Tags()[kind]:
                steps = [event.step for event in read(tag)]
                assert len(steps) == len(set(steps)), (str(run_dir.relative_to(board)), tag, steps)
    summary = events(board / "summary")
    figures = {tag: len(summary.Images(tag)) for tag in summary.Tags()["images"]}
    assert {"accuracy_vs_flops", "accuracy_ratio", "tokens_per_layer"} <= set(figures), figures
    assert set(figures.values()) == {1}, figures


def test_write_atomic_interrupted_leaves_no_temporary_file(tmp_path, monkeypatch):
    import research.storage as storage

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        storage.write_atomic(tmp_path / "result.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_lock_is_taken_before_the_data_or_the_model_loads(micro_model, experiment, tmp_path, monkeypatch):
    import research.run as run_module

    out = tmp_path / "runs"
    held = []

    class Loaded(Exception):
        pass

    def lock_held() -> bool:
        with (out / "life" / ".lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
            return False

    def open_tasks(experiment):
        held.append((out / "life" / ".lock").is_file() and lock_held())
        raise Loaded

    monkeypatch.setattr(run_module, "open_tasks", open_tasks)
    with pytest.raises(Loaded):
        run(load_config(args(experiment, micro_model, out)))
    assert held == [True]


def test_stale_temporaries_go_all_under_the_lock_and_only_a_dead_writers_elsewhere(tmp_path):
    import research.storage as storage

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = [f".summary.csv.{dead.stdout.strip()}.tmp", f".result.json.{os.getpid()}.tmp", "keep.tmp", "a.json"]
    for folder in ("locked", "shared"):
        for name in names:
            (tmp_path / folder / "sub").mkdir(parents=True, exist_ok=True)
            (tmp_path / folder / "sub" / name).write_text("x")
    storage.remove_stale_temporaries(tmp_path / "locked", locked=True)
    storage.remove_stale_temporaries(tmp_path / "shared", locked=False)
    storage.remove_stale_temporaries(tmp_path / "missing", locked=False)
    assert sorted(p.name for p in (tmp_path / "locked" / "sub").iterdir()) == ["a.json", "keep.tmp"]
    assert sorted(p.name for p in (tmp_path / "shared" / "sub").iterdir()) == [names[1], "a.json", "keep.tmp"]
