"""``python -m research.run``: sweep, resume, failures, TensorBoard output and one-line errors.

A micro LLaVA with the shapes tokenizer and processor (random weights) is saved to disk once; the
runs use a handful of samples so each takes seconds.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from research.config import ConfigError, load_config
from research.run import TIMING_COLUMNS, main, run
from research.shapes_model.modeling import ShapesModelConfig, build_clip, build_llava
from research.shapes_model.vocab import build_processor
from research.sweep import plan_sweep

MICRO = ShapesModelConfig(
    vision_hidden=32, vision_layers=1, text_encoder_hidden=32, text_encoder_layers=1, projection_dim=16,
    llm_hidden=32, llm_layers=4, llm_heads=2, llm_intermediate=64,
)
FAST = ["data.limit=6", "eval.batch_size=3", "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=1"]


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("micro_llava")
    clip = build_clip(MICRO)
    build_llava(MICRO, clip).save_pretrained(path)
    build_processor().save_pretrained(path)
    clip.save_pretrained(path / "clip")
    build_processor().tokenizer.save_pretrained(path / "clip")
    return path


@pytest.fixture
def experiment(tmp_path) -> Path:
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(textwrap.dedent("""\
        # python -m research.run experiment=<this file> model.path=<micro model>
        scorers: [text_prior, random]
        schedules: [{name: layers, layers: [0, 2]}]
        budgets: [48, 24]
        """))
    return path


def args(experiment: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [f"experiment={experiment}", f"model.path={model}", f"output_dir={out}", *FAST, *extra]


def read_summary(out: Path) -> list[dict]:
    with (out / "tiny_sweep" / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_writes_summary_tensorboard_and_resumes(micro_model, experiment, tmp_path):
    out = tmp_path / "runs"
    rows = run(load_config(args(experiment, micro_model, out)))
    assert [r["scorer"] for r in rows] == ["vanilla"] + ["text_prior"] * 2 + ["random"] * 2
    assert all(r["status"] == "ok" for r in rows)
    summary = read_summary(out)
    assert {"scorer", "schedule", "layers", "budget", "accuracy", "accuracy_ratio", "prefill_ms", "flops_ratio",
            "avg_tokens", "status"} <= set(summary[0])
    assert float(summary[2]["flops_ratio"]) < float(summary[1]["flops_ratio"]) < 1.0  # budget 24 < 48 < all
    assert (out / "tiny_sweep" / "summary.md").read_text().count("\n") == 2 + len(rows)
    predictions = (out / "tiny_sweep" / "predictions" / "vanilla.jsonl").read_text().splitlines()
    assert len(predictions) == 6 and '"correct"' in predictions[0]

    run_dir = out / "tiny_sweep" / "tensorboard" / "text_prior__layers0-2__b24"
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"metrics/accuracy", "metrics/prefill_ms", "metrics/gflops"} <= set(tags["scalars"])
    assert any(tag.startswith("kept_tokens/") for tag in tags["images"])
    assert events.PluginTagToContent("hparams")  # the HParams dashboard entry of this combination

    # Re-running the same command reuses every finished combination and yields the same summary.
    start = time.perf_counter()
    run(load_config(args(experiment, micro_model, out)))
    assert time.perf_counter() - start < 30
    again = read_summary(out)
    assert again == summary


@pytest.mark.slow
def test_same_seed_same_summary_apart_from_timing(micro_model, experiment, tmp_path):
    summaries = []
    for name in ("a", "b"):
        run(load_config(args(experiment, micro_model, tmp_path / name)))
        rows = read_summary(tmp_path / name)
        summaries.append([{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows])
    assert summaries[0] == summaries[1]


@pytest.mark.slow
def test_user_scorer_from_outside_the_repo_and_a_failing_combination(micro_model, experiment, tmp_path, monkeypatch):
    package = tmp_path / "user_code"
    package.mkdir()
    (package / "my_scorers.py").write_text(textwrap.dedent("""\
        from dataclasses import dataclass
        from scorers import SCORERS, Scorer

        @SCORERS.register("user_norm")
        @dataclass
        class UserNorm(Scorer):
            def score(self, signals):
                return signals.t2v.sum(1)

        @SCORERS.register("user_broken")
        @dataclass
        class UserBroken(Scorer):
            def score(self, signals):
                raise RuntimeError("this scorer always fails")
        """))
    monkeypatch.syspath_prepend(str(package))
    out = tmp_path / "runs"
    rows = run(load_config(args(experiment, micro_model, out, "imports=[my_scorers]",
                                "scorers=[user_broken,user_norm]", "budgets=[24]")))
    status = {r["scorer"]: (r["status"], r["error"]) for r in rows}
    assert status["user_norm"] == ("ok", "")
    assert status["user_broken"][0] == "failed" and "this scorer always fails" in status["user_broken"][1]
    assert status["vanilla"][0] == "ok"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["experiment=no_such_experiment"], "unknown experiment 'no_such_experiment'; choose one of"),
        (["scorers=[text_priro]"], "Did you mean 'text_prior'?"),
        (["eval.batchsize=4"], "unknown config key 'eval.batchsize'"),
        (["budgets=[500]"], "exceeds the 144 vision tokens"),
        (["schedules=[{name: layers, layers: [9]}]"], "out of range for a 4-layer LLM"),
        (["model.path=/no/such/model"], "holds no config.json"),
    ],
)
def test_bad_input_exits_with_one_line_before_loading(micro_model, experiment, tmp_path, capsys, extra, message):
    code = main(args(experiment, micro_model, tmp_path / "runs", *extra))
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert message in error and "\n" not in error
    assert not (tmp_path / "runs").exists()  # nothing was run


def test_entry_point_runs_as_a_module(micro_model, experiment, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "research.run", *args(experiment, micro_model, tmp_path / "runs", "scorers=[typo]")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "unknown scorer 'typo'" in result.stderr


def test_config_rejects_non_key_value_arguments():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["ablation_locations"])


@pytest.mark.slow
def test_analyses_and_a_cached_changepoint_schedule(micro_model, experiment, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    for analysis in ("attention_shifts", "text_dynamics"):
        run(load_config(args(experiment, micro_model, out, f"analysis={analysis}", "data.limit=4")))
    shifts = out / "tiny_sweep" / "attention_shifts.csv"
    assert shifts.read_text().startswith("layer,shifts") and (out / "tiny_sweep" / "text_dynamics.csv").is_file()
    events = EventAccumulator(str(out / "tiny_sweep" / "tensorboard" / "attention_shifts"),
                              size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert events.Tags()["histograms"] and events.Tags()["images"]

    sweep = ["schedules=[{name: changepoint, samples: 4}]", "scorers=[text_prior]", "budgets=[100]"]
    rows = run(load_config(args(experiment, micro_model, out, *sweep)))
    assert rows[1]["schedule"] == "changepoint(samples=4)" and rows[1]["status"] == "ok"
    assert "derived from 4 samples" in capsys.readouterr().out

    import research.analysis.collect as collect

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached shift histogram must be reused")

    monkeypatch.setattr(collect, "attention_shift_histogram", no_recompute)
    again = run(load_config(args(experiment, micro_model, out, *sweep)))
    assert again == rows
    assert "reusing the calibration cached" in capsys.readouterr().out


PEAK_AT_2 = [0, 0, 10, 0]  # changepoint rule: one peak at layer 2 -> prune after layer 2 only
UNREACHABLE = ["schedules=[{name: changepoint}, {name: layers, layers: [0, 2]}]", "scorers=[text_prior]",
               "budgets=[100, 20]"]  # after layer 2 only, layers 0-1 keep all 144: the average is >= 72


def test_unreachable_budget_of_calibrated_layers_is_a_failed_combination(micro_model, experiment, tmp_path):
    cfg = load_config(args(experiment, micro_model, tmp_path, *UNREACHABLE))
    combos = {c.name: c for c in plan_sweep(cfg, 4, 144, histograms={0: PEAK_AT_2})}
    failed = [c for c in combos.values() if c.error]
    assert [c.name for c in failed] == ["text_prior__changepoint__b20"]
    assert "unreachable for locations [2]" in failed[0].error and "\n" not in failed[0].error
    assert combos["text_prior__changepoint__b100"].locations == [2]
    assert {"vanilla", "text_prior__layers0-2__b20"} <= set(combos)

    explicit = load_config(args(experiment, micro_model, tmp_path, "schedules=[{name: changepoint, layers: [2]}]",
                                "budgets=[20]"))
    with pytest.raises(ConfigError, match="unreachable for locations \\[2\\]"):
        plan_sweep(explicit, 4, 144)  # layers the user wrote down are bad input: stop before loading


@pytest.mark.slow
def test_sweep_goes_on_past_a_calibrated_schedule_that_cannot_reach_a_budget(
    micro_model, experiment, tmp_path, monkeypatch
):
    import research.analysis.collect as collect

    monkeypatch.setattr(collect, "attention_shift_histogram", lambda *args, **kwargs: torch.tensor(PEAK_AT_2))
    code = main(args(experiment, micro_model, tmp_path / "runs", *UNREACHABLE))
    rows = {(r["schedule"], r["budget"]): r for r in read_summary(tmp_path / "runs")}
    assert code == 1  # a failed row makes the command fail, after everything else has run
    failed = rows[("changepoint", "20.0")]
    assert failed["status"] == "failed" and "unreachable for locations [2]" in failed["error"]
    assert failed["accuracy"] == "" and failed["avg_tokens"] == ""
    ran = [r for key, r in rows.items() if key != ("changepoint", "20.0")]
    assert len(ran) == 4 and all(r["status"] == "ok" for r in ran)
    assert rows[("changepoint", "100.0")]["layers"] == "2"
