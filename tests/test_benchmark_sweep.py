"""``python -m research.run`` over several benchmarks read from snapshots: the Table-1 summary, TensorBoard
scalars per benchmark, resume per (combination, benchmark), bad data before the model loads."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from research.combination import Combination
from research.config import load_config
from research.data.fixtures import WRITERS
from research.experiment import resolve
from research.report.summary import summarise_benchmarks
from research.run import main, run
from research.tasks import open_tasks

FAST = ["eval.batch_size=2", "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=1",
        "eval.max_new_tokens=2"]


@pytest.fixture
def experiment(tmp_path) -> Path:
    path = tmp_path / "bench_sweep.yaml"
    path.write_text(textwrap.dedent("""\
        scorers: [text_prior]
        schedules: [{name: layers, layers: [0, 2]}]
        budgets: [24]
        """))
    return path


def snapshots(root: Path, *names: str, broken: dict[str, int] | None = None) -> Path:
    for name in names:
        WRITERS[name](root, (broken or {}).get(name))
    return root


def args(experiment: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [f"experiment={experiment}", f"model.path={model}", f"output_dir={out}", *FAST, *extra]


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def scalars(run_dir: Path) -> set[str]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.slow
def test_two_benchmarks_table1_layout_tensorboard_and_resume_per_benchmark(micro_model, experiment, tmp_path,
                                                                           capsys):
    root = snapshots(tmp_path / "lmms-lab", "mme", "pope")
    out = tmp_path / "runs"
    cfg = load_config(args(experiment, micro_model, out, "data.name=[mme,pope]", f"data.root={root}"))
    rows = run(cfg)
    assert [r["scorer"] for r in rows] == ["vanilla", "text_prior"] and all(r["status"] == "ok" for r in rows)
    table = read_csv(out / "bench_sweep" / "summary.csv")
    assert list(table[0]) == ["scorer", "schedule", "layers", "budget", "keep", "positions", "mme", "mme_ratio",
                              "pope", "pope_ratio", "avg_ratio", "flops_ratio", "prefill_ms", "avg_tokens",
                              "computed_avg_tokens", "mme_skipped", "pope_skipped", "mme_prefill_ms", "mme_gflops",
                              "pope_prefill_ms", "pope_gflops", "mme_ci_low", "mme_ci_high", "mme_ratio_ci_low",
                              "mme_ratio_ci_high", "mme_delta", "mme_p_vs_vanilla", "mme_p_vs_ref", "pope_ci_low",
                              "pope_ci_high", "pope_ratio_ci_low", "pope_ratio_ci_high", "pope_delta",
                              "pope_p_vs_vanilla", "pope_p_vs_ref", "pope_f1", "pope_f1_ci_low", "pope_f1_ci_high",
                              "avg_ratio_ci_low", "avg_ratio_ci_high", "reference", "same_plan_as", "seeds_mean",
                              "seeds_sd", "seeds_n", "status", "error"]
    vanilla, pruned = table  # the micro model answers nothing right: every score 0
    for name in ("pope", "pope_f1"):  # POPE's headline and F1 with their intervals: zero width at 0
        assert [(r[name], r[f"{name}_ci_low"], r[f"{name}_ci_high"]) for r in table] == [("0.0", "0.0", "0.0")] * 2
    assert vanilla["pope_p_vs_vanilla"] == "" and pruned["pope_p_vs_vanilla"] == "1.0"  # identical: p = 1
    # the fixture's MME has one image per subtask: nothing to resample within a subtask, so no interval
    assert (pruned["mme_ci_low"], pruned["mme_ci_high"]) == ("", "")
    assert [r["mme_skipped"] for r in table] == ["0", "0"]
    header = (out / "bench_sweep" / "summary.md").read_text().splitlines()[0]
    assert "| mme | mme_ratio | pope | pope_ratio | avg_ratio |" in header
    for name, lines in (("mme", 4), ("pope", 3)):
        predictions = out / "bench_sweep" / "predictions" / name / "vanilla.jsonl"
        assert len(predictions.read_text().splitlines()) == lines
        assert (out / "bench_sweep" / "results" / name / "text_prior__layers0-2__b24.json").is_file()
    tensorboard = out / "bench_sweep" / "tensorboard"
    assert {"metrics/accuracy", "metrics/total", "metrics/perception", "metrics/cognition"} <= scalars(
        tensorboard / "mme" / "vanilla")
    assert {"metrics/accuracy", "metrics/precision", "metrics/recall", "metrics/f1", "metrics/yes_ratio"} <= scalars(
        tensorboard / "pope" / "text_prior" / "layers[0-2]" / "24")
    summary = EventAccumulator(str(tensorboard / "summary"), size_guidance={"tensors": 0})
    summary.Reload()  # the summary run over several benchmarks: the one HParams experiment and the table
    assert "_hparams_/experiment" in summary.PluginTagToContent("hparams")
    table = summary.Tensors("combinations/text_summary")[0].tensor_proto.string_val[0].decode().splitlines()
    assert "| mme | pope | avg ratio |" in table[0] and len(table) == 2 + len(rows)
    assert {"avg_ratio", "mme/tokens_per_layer", "pope/tokens_per_layer"} <= set(summary.Tags()["images"])

    capsys.readouterr()
    run(cfg)
    assert "resume: reusing 4 finished combination(s), running 0" in capsys.readouterr().out
    (out / "bench_sweep" / "results" / "pope" / "vanilla.json").unlink()
    again = run(cfg)
    assert "resume: reusing 3 finished combination(s), running 1" in capsys.readouterr().out
    assert again == rows or [r["pope"] for r in again] == [r["pope"] for r in rows]


@pytest.mark.slow
def test_an_undecodable_image_in_a_snapshot_is_skipped_and_counted(micro_model, experiment, tmp_path, caplog):
    root = snapshots(tmp_path / "lmms-lab", "textvqa", "gqa", broken={"textvqa": 1})
    out = tmp_path / "runs"
    rows = run(load_config(args(experiment, micro_model, out, "data.name=[textvqa,gqa]", f"data.root={root}")))
    assert [r["textvqa_skipped"] for r in rows] == [1, 1] and [r["gqa_skipped"] for r in rows] == [0, 0]
    assert "skipping sample 34603: image (" in caplog.text and "row 1 of validation-00000-of-00001.parquet" in \
        caplog.text
    predictions = (out / "bench_sweep" / "predictions" / "textvqa" / "vanilla.jsonl").read_text().splitlines()
    assert len(predictions) == 2


@pytest.mark.parametrize(("case", "message"), [
    ("missing-folder", "holds no GQA/ snapshot for benchmark 'gqa'"),
    ("missing-field", "has no field(s) ['category']"),
    ("unknown-split", "unknown split 'val' for benchmark 'mme'"),
    ("no-root", "benchmark 'mme' needs data.root="),
    ("unknown-benchmark", "unknown dataset 'mmmu'"),
])
def test_bad_data_exits_2_with_one_line_and_no_output_directory(micro_model, experiment, tmp_path, capsys, case,
                                                                 message):
    root = snapshots(tmp_path / "lmms-lab", "mme")
    extra = ["data.name=[mme,gqa]" if case == "missing-folder" else "data.name=[mme]", f"data.root={root}"]
    if case == "missing-field":
        for file in (root / "MME" / "data").glob("*.parquet"):
            pq.write_table(pq.read_table(file).drop_columns(["category"]), file)
    elif case == "unknown-split":
        extra.append("data.split=val")
    elif case == "no-root":
        extra = ["data.name=mme"]
    elif case == "unknown-benchmark":
        extra = ["data.name=[mme,mmmu]", f"data.root={root}"]
    out = tmp_path / "runs"
    assert main(args(experiment, micro_model, out, *extra)) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]
    assert not out.exists()


def test_the_shapes_fingerprint_settings_are_unchanged(experiment, micro_model, tmp_path):
    """The default dataset's data and eval settings hash as before benchmarks existed: finished shapes results
    are reused (the fingerprint hashed ``cfg.data`` = name, split, limit, calibration_split, and max_new_tokens 3)."""
    task = open_tasks(resolve(load_config(args(experiment, micro_model, tmp_path, "data.limit=2",
                                                "eval.max_new_tokens=3"))))[0]
    assert task.data_key == {"name": "shapes", "split": "test", "limit": 2, "calibration_split": None}
    default = open_tasks(resolve(load_config([f"experiment={experiment}", "data.limit=2"])))[0]
    assert default.max_new_tokens == 3 and default.until == () and default.folder == ""


def test_table1_average_ratio_is_the_mean_of_the_benchmark_ratios():
    class Named:
        summary_counts = ("unparsed",)

    tasks = [type("T", (), {"name": n, "dataset": Named() if n == "mmbench" else object()})() for n in
             ("mme", "mmbench")]
    combos = [Combination("vanilla", "-", None), Combination("fastv", "layers[2]", 64.0, [2], [64])]

    def result(accuracy: float, flops: float, **extra) -> dict:
        return {"status": "ok", "accuracy": accuracy, "flops": flops, "prefill_ms": 10.0, "gflops": flops,
                "skipped_images": 0, **extra}

    results = {"mme": {"vanilla": result(1864, 4.0), "fastv__layers2__b64": result(1490, 1.0)},
               "mmbench": {"vanilla": result(64.6, 4.0, unparsed=0.0),
                           "fastv__layers2__b64": result(56.1, 2.0, unparsed=3.0)}}
    rows = summarise_benchmarks(combos, {k: {("vanilla" if n == "vanilla" else combos[1].name): r
                                              for n, r in v.items()} for k, v in results.items()}, tasks)
    assert rows[0]["avg_ratio"] == 1.0 and rows[0]["mmbench_unparsed"] == 0
    assert rows[1]["mme_ratio"] == round(1490 / 1864, 4)
    assert rows[1]["avg_ratio"] == round((1490 / 1864 + 56.1 / 64.6) / 2, 4)
    assert rows[1]["flops_ratio"] == round((0.25 + 0.5) / 2, 4) and rows[1]["mmbench_unparsed"] == 3


README_COMMANDS = """\
python -m research.data.fixtures {root}
python -m research.run experiment=main_table data.name=[mme,pope] data.root={root} output_dir={out} \
scorers=[text_prior] budgets=[64] eval.latency_samples=2 eval.overlays=1 eval.max_new_tokens=4
"""


@pytest.mark.slow
def test_readme_benchmark_sweep_with_the_shipped_model(tmp_path):
    """The README's fixture sweep, as a user types it, with the shipped shapes model."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert README_COMMANDS.format(root="/tmp/lmms-lab", out="/tmp/runs") in readme.replace(" \\\n", " ")
    root, out = tmp_path / "lmms-lab", tmp_path / "runs"
    for command in README_COMMANDS.format(root=root, out=out).splitlines():
        done = subprocess.run([sys.executable, "-m", *command.split()[2:]], capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    header, rule, vanilla, pruned, blank, *notes = (out / "main_table" / "summary.md").read_text().splitlines()
    assert "| mme | mme_ratio | pope | pope_ratio | avg_ratio |" in header
    assert vanilla.startswith("| vanilla |") and pruned.startswith("| text_prior |") and "| ok |" in pruned
