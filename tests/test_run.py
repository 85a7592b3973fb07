"""``python -m research.run``: sweep, resume, failures, TensorBoard output and one-line errors.

A micro LLaVA with the shapes tokenizer and processor (random weights; ``micro_model`` in conftest.py) is saved
to disk once; the runs use a handful of samples so each takes seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import TIMING_COLUMNS, plan

from research.config import ConfigError, load_config
from research.run import main, run
from research.storage import weights_digest

FAST = ["data.limit=6", "eval.batch_size=3", "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=1",
        "eval.analysis_samples=4"]


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
def test_sweep_writes_summary_tensorboard_and_resumes(micro_model, experiment, tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    rows = run(load_config(args(experiment, micro_model, out)))
    assert [r["scorer"] for r in rows] == ["vanilla"] + ["text_prior"] * 2 + ["random"] * 2
    assert all(r["status"] == "ok" for r in rows)
    summary = read_summary(out)
    assert {"scorer", "schedule", "layers", "budget", "accuracy", "accuracy_ratio", "prefill_ms", "flops_ratio",
            "avg_tokens", "status"} <= set(summary[0])
    assert float(summary[2]["flops_ratio"]) < float(summary[1]["flops_ratio"]) < 1.0  # budget 24 < 48 < all
    table, notes = (out / "tiny_sweep" / "summary.md").read_text().split("\n\n")
    assert table.count("\n") == 1 + len(rows) and notes.startswith("Intervals: 95% paired bootstrap (BCa")
    predictions = (out / "tiny_sweep" / "predictions" / "vanilla.jsonl").read_text().splitlines()
    assert len(predictions) == 6 and '"correct"' in predictions[0]

    run_dir = out / "tiny_sweep" / "tensorboard" / "text_prior" / "24" / "layers[0-2]"  # its label: what differs first
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"metrics/accuracy", "metrics/prefill_ms", "metrics/gflops"} <= set(tags["scalars"])
    assert any(tag.startswith("kept_tokens/") for tag in tags["images"])
    assert events.PluginTagToContent("hparams")  # the HParams dashboard entry of this combination
    summary_figures = _events(out / "tiny_sweep" / "tensorboard" / "summary").Tags()["images"]
    assert set(summary_figures) == {"accuracy_vs_budget", "accuracy_vs_flops", "accuracy_ratio", "tokens_per_layer",
                                    "dynamics/relevant_recall"}

    # Re-running the same command reuses every finished combination (none runs again: no clock needed)
    # and yields the same summary.
    import research.execution as execution

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished combination ran again")

    monkeypatch.setattr(execution, "run_combination", must_not_run)
    run(load_config(args(experiment, micro_model, out)))
    assert "reusing 5 finished combination(s), running 0" in capsys.readouterr().out
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
    assert events.Tags()["images"] == ["attention_shifts/shift_histogram"]  # integer counts: one bar per layer
    assert not events.Tags()["histograms"]  # not TensorBoard's rebinned histogram

    sweep = ["schedules=[{name: changepoint, samples: 4}]", "scorers=[text_prior]", "budgets=[100]"]
    rows = run(load_config(args(experiment, micro_model, out, *sweep)))
    assert rows[1]["schedule"] == "changepoint(samples=4)@val" and rows[1]["status"] == "ok"  # calibrated on val
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
    combos = {c.name: c for c in plan(cfg, 4, 144, histograms={0: PEAK_AT_2})}
    failed = [c for c in combos.values() if c.error]
    assert [c.name for c in failed] == ["text_prior__changepoint_val__b20"]
    assert "unreachable for locations [2]" in failed[0].error and "\n" not in failed[0].error
    assert combos["text_prior__changepoint_val__b100"].locations == [2]
    assert {"vanilla", "text_prior__layers0-2__b20"} <= set(combos)

    explicit = load_config(args(experiment, micro_model, tmp_path, "schedules=[{name: changepoint, layers: [2]}]",
                                "budgets=[20]"))
    with pytest.raises(ConfigError, match="unreachable for locations \\[2\\]"):
        plan(explicit, 4, 144)  # layers the user wrote down are bad input: stop before loading


@pytest.mark.slow
def test_sweep_goes_on_past_a_calibrated_schedule_that_cannot_reach_a_budget(
    micro_model, experiment, tmp_path, monkeypatch
):
    import research.analysis.collect as collect

    monkeypatch.setattr(collect, "attention_shift_histogram", lambda *args, **kwargs: torch.tensor(PEAK_AT_2))
    code = main(args(experiment, micro_model, tmp_path / "runs", *UNREACHABLE))
    rows = {(r["schedule"], r["budget"]): r for r in read_summary(tmp_path / "runs")}
    assert code == 1  # a failed row makes the command fail, after everything else has run
    failed = rows[("changepoint@val", "20.0")]
    assert failed["status"] == "failed" and "unreachable for locations [2]" in failed["error"]
    assert failed["accuracy"] == "" and failed["avg_tokens"] == ""
    ran = [r for key, r in rows.items() if key != ("changepoint@val", "20.0")]
    assert len(ran) == 4 and all(r["status"] == "ok" for r in ran)
    assert rows[("changepoint@val", "100.0")]["layers"] == "2"


# ---- bad input: one line, exit 2, before any model loads, no output directory ---------------------------------
@pytest.mark.parametrize(
    "extra, message",
    [
        (["eval.batch_size=0"], "eval.batch_size=0 out of range; valid: an integer >= 1"),
        (["eval.batch_size=-1"], "eval.batch_size=-1 out of range"),
        (["data.limit=-5"], "data.limit=-5 out of range"),
        (["data.limit=0"], "data.limit=0 out of range"),
        (["budgets=[nan]"], "target nan is not a number of tokens"),
        (["budgets=[0]"], "keeps 0 vision tokens"),
        (["schedules=[{name: layers, layers: [-1, 2]}]"], "scorer 'text_prior' cannot prune at location -1"),
        (["scorers=[]"], "scorers is empty"),
        (["schedules=[]"], "schedules is empty"),
        (["output_dir=/proc/vtprune-test"], "cannot be written"),
    ],
    ids=["batch-0", "batch-negative", "limit-negative", "limit-0", "budget-nan", "budget-0", "interface-layer",
         "no-scorers", "no-schedules", "unwritable-output"],
)
def test_more_bad_input_exits_with_one_line_before_loading(micro_model, experiment, tmp_path, capsys, extra,
                                                            message):
    test_bad_input_exits_with_one_line_before_loading(micro_model, experiment, tmp_path, capsys, extra, message)


def _copy_model(micro_model: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(micro_model, tmp_path / "model_copy"))


@pytest.mark.parametrize("case", ["yaml-syntax", "yaml-list", "config-not-json", "config-no-text", "no-weights"])
def test_bad_files_exit_with_one_line_before_loading(micro_model, experiment, tmp_path, capsys, case):
    model = micro_model
    if case == "yaml-syntax":
        experiment.write_text("scorers: [text_prior\nbudgets: {48\n")
    elif case == "yaml-list":
        experiment.write_text("- text_prior\n- random\n")
    else:
        model = _copy_model(micro_model, tmp_path)
        if case == "config-not-json":
            (model / "config.json").write_text("{not json")
        elif case == "config-no-text":
            (model / "config.json").write_text('{"model_type": "llava"}')
        else:
            for weights in model.glob("*.safetensors"):
                weights.unlink()
    expected = {"yaml-syntax": "is not valid YAML", "yaml-list": "must hold a mapping of config keys",
                "config-not-json": "is not a usable model config", "config-no-text": "is not a usable model config",
                "no-weights": "holds no *.safetensors weights"}[case]
    code = main(args(experiment, model, tmp_path / "runs"))
    error = capsys.readouterr().err.strip()
    assert code == 2 and expected in error and "\n" not in error, error
    assert not (tmp_path / "runs").exists()


def test_model_shape_reads_defaults_a_real_config_json_leaves_out(tmp_path):
    """llava-hf/llava-1.5-7b-hf's config.json has no text_config.num_hidden_layers (Llama's default: 32)."""
    import json

    from research.models.registry import inspect_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llava", "image_token_index": 32000, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "vocab_size": 32064},
        "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14,
                          "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "projection_dim": 768},
    }))
    (tmp_path / "model.safetensors").touch()
    layout = inspect_checkpoint("auto", tmp_path).layout
    assert (layout.num_layers, layout.nominal_tokens) == (32, 576)


def test_help_lists_experiments_and_config_keys(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: python -m research.run" in text and "ablation_locations" in text and "batch_size:" in text


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent.parent / "experiments").glob("*.yaml")))
def test_every_shipped_experiment_loads_and_plans(name):
    """A shipped experiment that no longer validates fails CI (no weights: the default model's shape, or for an
    experiment written for LLaVA-1.5-7B its 32 layers and 576 image tokens)."""
    from research.experiment import resolve
    from research.sweep import plan_sweep

    cfg = load_config([f"experiment={name}"])
    if cfg.model.name == "llava15":
        plan(cfg, 32, 576, allow_pending=True)
    else:
        plan_sweep(resolve(cfg), allow_pending=True)


def test_schedules_differing_only_in_scale_from_are_different_combinations(micro_model, experiment, tmp_path):
    cfg = load_config(args(experiment, micro_model, tmp_path, "scorers=[text_prior]", "budgets=[48]",
                           "schedules=[{name: layers, layers: [1, 10, 20]}, "
                           "{name: layers, layers: [1, 10, 20], scale_from: 32}]"))
    combos = plan(cfg, 32, 144)
    assert [c.name for c in combos[1:]] == ["text_prior__layers1-10-20__b48", "text_prior__layers1-10-20_of32__b48"]


def test_changepoint_calibrates_on_a_split_other_than_the_evaluated_one(micro_model, experiment, tmp_path):
    from research.experiment import resolve

    def calibration_split(extra):
        return resolve(load_config([*args(experiment, micro_model, tmp_path), *extra])).data.calibration_split

    assert calibration_split([]) == "val"  # the test split is evaluated
    assert calibration_split(["data.split=val"]) == "train"
    assert calibration_split(["data.calibration_split=train"]) == "train"


# ---- nothing lost, nothing stale ------------------------------------------------------------------------------
@pytest.mark.slow
def test_damaged_results_are_recomputed_and_edited_scorers_are_not_reused(micro_model, experiment, tmp_path,
                                                                         monkeypatch, capsys):
    package = tmp_path / "pkg"
    package.mkdir()
    source = package / "edited_scorer.py"
    source.write_text(textwrap.dedent("""\
        from dataclasses import dataclass
        from scorers import SCORERS, Scorer

        @SCORERS.register("user_edited")
        @dataclass
        class Edited(Scorer):
            def score(self, signals):
                return signals.t2v.sum(1)
        """))
    monkeypatch.syspath_prepend(str(package))
    out = tmp_path / "runs"
    run_args = args(experiment, micro_model, out, "imports=[edited_scorer]", "scorers=[user_edited,random]",
                    "budgets=[24]")
    assert main(run_args) == 0
    results = out / "tiny_sweep" / "results"
    vanilla = (results / "vanilla.json").read_text()
    (results / "random__layers0-2__b24.json").write_text("")  # a kill inside a write, before atomic writes
    source.write_text(source.read_text().replace("sum(1)", "mean(1)"))  # the scorer's code changes
    capsys.readouterr()
    assert main(run_args) == 0
    printed = capsys.readouterr().out
    assert "reusing 1 finished combination(s), running 2" in printed
    assert "user_edited__layers0-2__b24 (scorer changed)" in printed
    assert (results / "vanilla.json").read_text() == vanilla  # reused byte for byte
    assert read_summary(out)[2]["status"] == "ok"  # the damaged result was recomputed


@pytest.mark.slow
def test_a_failed_write_stops_the_sweep_with_one_line_and_keeps_what_finished(micro_model, experiment, tmp_path,
                                                                              monkeypatch, capsys):
    import errno
    import os

    import research.storage as storage

    synced, real_fsync = [], os.fsync

    def disk_full_after_three_files(fd):  # config.yaml, vanilla's predictions and result fit; then the disk is full
        if len(synced) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", disk_full_after_three_files)
    out = tmp_path / "runs"
    code = main(args(experiment, micro_model, out))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1
    assert "No space left on device" in errors[0] and "kept 1 finished combination(s)" in errors[0]
    results = sorted((out / "tiny_sweep" / "results").iterdir())
    assert [r.name for r in results] == ["vanilla.json"] and json.loads(results[0].read_text())["status"] == "ok"
    predictions = sorted(p.name for p in (out / "tiny_sweep" / "predictions").iterdir())
    assert predictions == ["vanilla.jsonl"]  # no half-written predictions


@pytest.mark.slow
def test_a_second_run_into_a_directory_in_use_stops_with_the_lock_message(micro_model, experiment, tmp_path):
    """The first run's scorer waits until the second run has finished, so the two always overlap."""
    import os

    package, release = tmp_path / "pkg", tmp_path / "release"
    package.mkdir()
    (package / "waiting_scorer.py").write_text(textwrap.dedent(f"""\
        import time
        from dataclasses import dataclass
        from pathlib import Path
        from scorers import SCORERS, Scorer

        @SCORERS.register("waits")
        @dataclass
        class Waits(Scorer):
            def score(self, signals):
                while not Path({str(release)!r}).exists():
                    time.sleep(0.05)
                return signals.t2v.sum(1)
        """))
    env = {**os.environ, "PYTHONPATH": f"{package}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "research.run",
               *args(experiment, micro_model, out, "imports=[waiting_scorer]", "scorers=[waits]", "budgets=[24]")]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lock = out / "tiny_sweep" / ".lock"
    deadline = time.monotonic() + 300
    while not (lock.is_file() and lock.read_text().startswith("process")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    release.touch()
    assert first.wait(timeout=600) == 0
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 1 and len(errors) == 1 and f"in use by process {first.pid}" in errors[0]
    for predictions in (out / "tiny_sweep" / "predictions").glob("*.jsonl"):
        ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
        assert len(ids) == 6 and len(set(ids)) == 6


class ShapesWithABrokenImage:
    """The shapes test split, but sample 2's image is a truncated PNG file on disk."""

    broken_file: Path | None = None

    def __init__(self, split: str = "test", size: int | None = None) -> None:
        from research.data.shapes import ShapesVQA

        self.samples = list(ShapesVQA(split, size))

    def __iter__(self):
        import dataclasses

        for i, sample in enumerate(self.samples):
            yield dataclasses.replace(sample, image=str(self.broken_file)) if i == 2 else sample


@pytest.mark.slow
def test_an_undecodable_image_is_skipped_and_counted(micro_model, experiment, tmp_path, caplog):
    import io

    from PIL import Image

    from research.data import DATASETS

    if "shapes_broken" not in DATASETS:
        DATASETS.register("shapes_broken")(ShapesWithABrokenImage)
    encoded = io.BytesIO()
    Image.new("RGB", (48, 48), "red").save(encoded, format="PNG")
    ShapesWithABrokenImage.broken_file = tmp_path / "broken.png"
    ShapesWithABrokenImage.broken_file.write_bytes(encoded.getvalue()[:60])  # cut inside the image data
    out = tmp_path / "runs"
    rows = run(load_config(args(experiment, micro_model, out, "data.name=shapes_broken", "scorers=[random]",
                                "budgets=[24]")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["skipped_images"] for r in rows] == [1, 1]
    assert "skipping sample test-000002: image (file " in caplog.text and "broken.png" in caplog.text
    predictions = (out / "tiny_sweep" / "predictions" / "vanilla.jsonl").read_text().splitlines()
    assert len(predictions) == 5 and "test-000002" not in "".join(predictions)


def test_a_damaged_calibration_cache_is_recomputed_with_a_warning(micro_model, experiment, tmp_path, caplog):
    from research.experiment import resolve

    cfg = load_config(args(experiment, micro_model, tmp_path, "schedules=[{name: changepoint, samples: 4}]"))
    path = resolve(cfg).calibrations[0].cache_file
    parts = [str(micro_model.resolve()).encode(), (micro_model / "config.json").read_bytes(),
             weights_digest(micro_model).encode(), b"shapes", b"val", b"4"]
    assert path.name == f"attention_shifts-{hashlib.sha256(b'|'.join(parts)).hexdigest()[:16]}.json"
    path.parent.mkdir(parents=True)
    path.write_text("")  # a kill inside a non-atomic write
    [calibration] = resolve(cfg).calibrations
    assert calibration.cache_file == path and calibration.cached is None
    assert "ignoring unreadable calibration cache" in caplog.text


def test_the_weights_fingerprint_follows_the_weights_not_their_timestamps(micro_model, tmp_path):
    import os

    model = _copy_model(micro_model, tmp_path)
    before = weights_digest(model)
    os.utime(model / "model.safetensors", (0, 0))
    assert weights_digest(model) == before
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a retrained tensor
    (model / "model.safetensors").write_bytes(bytes(data))
    assert weights_digest(model) != before


def test_a_retrain_in_place_is_calibrated_anew(micro_model, experiment, tmp_path):
    """The shift histogram cached for a checkpoint is not reused once its weights change at the same path with the
    same config.json (a stale histogram would give the changepoint schedule the old model's layers)."""
    from research.experiment import resolve

    model = _copy_model(micro_model, tmp_path)
    cfg = load_config(args(experiment, model, tmp_path / "runs", "schedules=[{name: changepoint, samples: 4}]"))
    before = resolve(cfg).calibrations[0].cache_file
    assert resolve(cfg).calibrations[0].cache_file == before  # the same weights: the same cache
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a retrained tensor
    (model / "model.safetensors").write_bytes(bytes(data))
    assert resolve(cfg).calibrations[0].cache_file != before


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _text(events: EventAccumulator, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_single_budget_tensorboard_logs_each_value_once_with_status_flops_ratio_and_figures(
        micro_model, experiment, tmp_path, monkeypatch, capsys):
    package = tmp_path / "user_code"
    package.mkdir()
    (package / "tb_broken_scorer.py").write_text(textwrap.dedent("""\
        from dataclasses import dataclass
        from scorers import SCORERS, Scorer

        @SCORERS.register("tb_broken")
        @dataclass
        class Broken(Scorer):
            def score(self, signals):
                raise RuntimeError("this scorer always fails")
        """))
    monkeypatch.syspath_prepend(str(package))
    import research.evaluation as evaluation

    captions, titles = [], []

    def recording_overlay(image, grid, stages, stage_titles, caption=None):
        captions.append(caption)
        titles.append(stage_titles)
        return overlay(image, grid, stages, stage_titles, caption)

    overlay = evaluation.token_overlay
    monkeypatch.setattr(evaluation, "token_overlay", recording_overlay)
    out = tmp_path / "runs"
    rows = run(load_config(args(experiment, micro_model, out, "imports=[tb_broken_scorer]", "budgets=[24]",
                                "scorers=[{name: random, seed: 3}, tb_broken]")))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    board = out / "tiny_sweep" / "tensorboard"
    ok_run = board / "random(seed=3)" / "layers[0-2]" / "24"
    events = _events(ok_run)
    scalars = set(events.Tags()["scalars"])
    assert not any(tag.startswith("hparams/") for tag in scalars)  # each value once, under metrics/
    assert {"metrics/accuracy", "metrics/flops_ratio", "metrics/failed", "metrics/gflops"} <= scalars
    for tag in scalars:
        steps = [event.step for event in events.Scalars(tag)]
        assert steps == [0], (tag, steps)  # never written twice; per-layer curves are figures
    assert events.Scalars("metrics/failed")[0].value == 0
    assert 0 < events.Scalars("metrics/flops_ratio")[0].value < 1
    assert "status/text_summary" not in events.Tags()["tensors"]  # an ok run has no status card (the table says)
    hparams_yaml = (ok_run / "hparams.yaml").read_text()
    assert "scorer.seed" in hparams_yaml and "schedule.layers" in hparams_yaml
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["scorer.seed"].string_value == "3"
    assert "_hparams_/experiment" not in content  # the summary run holds the sweep's one experiment
    summary_content = _events(board / "summary").PluginTagToContent("hparams")
    experiment_info = plugin_data_pb2.HParamsPluginData.FromString(summary_content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment_info.metric_infos} >= {"metrics/accuracy", "metrics/flops_ratio"}

    assert any(tag.startswith("kept_tokens/") for tag in events.Tags()["images"])
    # Attention dynamics of the pruned model, on eval.analysis_samples=4 samples, next to its evaluation.
    for run_dir in (ok_run, board / "vanilla"):
        dynamics = _events(run_dir)
        assert {"dynamics/text_miou", "dynamics/shift_histogram", "dynamics/relevant_recall"} <= set(
            dynamics.Tags()["images"])
        assert {"metrics/adjacent_miou", "metrics/relevant_recall", "metrics/analysis_seconds",
                "metrics/analysis_share"} <= set(dynamics.Tags()["scalars"])
        assert _text(dynamics, "dynamics/shift_layers").startswith("[")
    results = out / "tiny_sweep" / "results"
    recall = json.loads((results / "randomseed=3__layers0-2__b24.json").read_text())["relevant_recall_per_layer"]
    assert recall[0] == 1.0 and recall[1] < 1.0  # layer 0 runs on every patch; a stage after it drops some
    assert json.loads((results / "vanilla.json").read_text())["relevant_recall_per_layer"] == [1.0] * 4
    summary_row = read_summary(out)[1]
    assert float(summary_row["relevant_recall"]) == pytest.approx(recall[-1], abs=1e-4)
    assert 0 <= float(summary_row["adjacent_miou"]) <= 1 and summary_row["shift_layers"]
    assert float(summary_row["analysis_s"]) > 0 and float(summary_row["eval_s"]) > 0
    result = json.loads((out / "tiny_sweep" / "results" / "randomseed=3__layers0-2__b24.json").read_text())
    assert result["analysis_samples"] == 4 and len(result["relevant_recall_per_stage"]) == 2
    first = json.loads(next((out / "tiny_sweep" / "predictions").glob("random*")).read_text().splitlines()[0])
    assert captions == [f"Q: {first['question']} | A: {first['answer']} | prediction: {first['prediction']}"]
    assert titles[0][0].startswith("after layer 0: ") and titles[0][0].endswith(" kept")

    summary = _events(board / "summary").Tags()["images"]
    assert set(summary) == {"accuracy_vs_flops", "accuracy_ratio", "tokens_per_layer",
                            "dynamics/relevant_recall"}  # one budget: no accuracy-vs-budget curve

    failed = _events(board / "tb_broken" / "layers[0-2]" / "24")
    assert failed.Scalars("metrics/failed")[0].value == 1
    assert "this scorer always fails" in _text(failed, "status")

    # The terminal: the re-run (the failed combination runs again) labels its progress bar and prints the
    # compact summary within 120 columns.
    capsys.readouterr()
    assert main(args(experiment, micro_model, out, "imports=[tb_broken_scorer]", "budgets=[24]",
                     "scorers=[{name: random, seed: 3}, tb_broken]")) == 1
    printed = capsys.readouterr()
    assert "[3/3] tb_broken/layers[0-2]/24" in printed.out + printed.err  # the progress bar: the run's label
    table = printed.out[printed.out.index("scorer "):printed.out.index("full table in")].splitlines()
    assert table[0].split() == ["scorer", "schedule", "budget", "accuracy", "95%", "CI", "ratio", "flops_ratio",
                                "status"]
    assert all(len(line) <= 120 for line in table)
    assert any(line.startswith("failed: tb_broken / layers") and "always fails" in line for line in table)


def test_chance_accuracy_of_shapes_weights_each_question_by_its_answer_count():
    from research.data.shapes import ANSWER_CHOICES, ShapesVQA
    from research.tasks import chance_accuracy

    samples = list(ShapesVQA("test", 10))
    expected = sum(1 / len(ANSWER_CHOICES[s.qtype]) for s in samples) / 10
    assert chance_accuracy(ShapesVQA("test", 10), samples) == pytest.approx(expected)
    assert 0 < expected < 1
    assert chance_accuracy(object(), samples) is None


def test_compact_table_fits_120_columns_and_names_failures():
    from research.report.summary import compact_table

    rows = [
        {"scorer": "vanilla", "schedule": "-", "budget": "all", "accuracy": 0.5, "accuracy_ratio": "",
         "flops_ratio": "", "status": "ok", "error": ""},
        {"scorer": "fastv(" + "k=2, " * 20 + ")", "schedule": "layers[" + "1-" * 40 + "]", "budget": 24.0,
         "accuracy": 1 / 3, "accuracy_ratio": 0.6667, "flops_ratio": 0.4, "status": "failed",
         "error": "RuntimeError: " + "x" * 200},
    ]
    lines = compact_table(rows).splitlines()
    assert max(map(len, lines)) <= 120 and len(lines) == 4
    assert lines[1].split() == ["vanilla", "-", "all", "0.5", "ok"]
    assert "0.3333" in lines[2] and "~" in lines[2] and lines[2].endswith("failed")
    assert lines[3].startswith("failed: fastv(")
