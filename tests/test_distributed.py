"""Several devices through Lightning: ``trainer.devices=2`` (DDP, gloo on CPU) gives the single-process summary,
and every sample is counted exactly once."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from research.config import ConfigError, load_config
from research.distributed import batches, gather_predictions
from research.run import TIMING_COLUMNS, run

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["experiment=main_table", "scorers=[text_prior,random]", "budgets=[32]", "data.limit=7", "eval.batch_size=2",
         "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=1", "eval.analysis_samples=3"]


def _summary(out: Path) -> list[dict]:
    with (out / "main_table" / "summary.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def _predictions(out: Path) -> dict[str, list[dict]]:
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((out / "main_table" / "predictions").glob("*.jsonl"))}


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
    assert len(list(vanilla.glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's


def test_gathered_predictions_count_a_repeated_sample_once():
    """A sampler that pads with repeats (torch's DistributedSampler) hands a sample to two ranks: it counts once."""
    rank_rows = [{"index": 0, "prediction": "a"}, {"index": 2, "prediction": "c"}, {"index": 0, "prediction": "a"}]
    module = SimpleNamespace(rows=rank_rows + [{"index": 1, "prediction": "b"}], skipped=["x", "x"],
                             error_message=None)
    assert gather_predictions(SimpleNamespace(world_size=1), module) == []
    assert [r["index"] for r in module.rows] == [0, 1, 2] and module.skipped == ["x"]


def test_batches_are_the_single_process_batches_with_sample_indices():
    assert batches(["a", "b", "c", "d", "e"], 2) == [[(0, "a"), (1, "b")], [(2, "c"), (3, "d")], [(4, "e")]]


@pytest.mark.parametrize("extra, message", [
    (["trainer.devices=0"], "trainer.devices=0 out of range"),
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
