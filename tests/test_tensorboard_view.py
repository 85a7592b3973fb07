"""TensorBoard as a user sees it: the event files of a tiny sweep read back the way TensorBoard reads them.

One HParams experiment (in the ``summary`` run) with every scorer and schedule parameter; one label per
combination shared by the run name, the HParams ``combination`` value and the figures' legends; no per-layer curve
as smoothed scalar steps; the summary's markdown table; the statistics columns as error bars and as each run's
``metrics/`` scalars, once, after a resume; a reused run logged under an older name moved to today's.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from torch.utils.tensorboard import SummaryWriter

from research.combination import Combination
from research.config import load_config
from research.run import run

FAST = ["data.limit=6", "eval.batch_size=3", "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=0",
        "eval.analysis_samples=3"]
SCHEDULES = """\
    schedules:
      - {name: layers, layers: [0, 2]}
      - {name: uniform, num_stages: 2, start: 0}
      - {name: random, seed: 0}
      - {name: random, seed: 1}
"""


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def runs(board: Path) -> dict[str, EventAccumulator]:
    """Every run under ``board`` by its TensorBoard name (its directory relative to ``board``)."""
    directories = sorted({p.parent for p in board.rglob("events.out.tfevents.*")})
    return {d.relative_to(board).as_posix(): events(d) for d in directories}


def hparams_content(accumulator: EventAccumulator) -> dict[str, bytes]:
    """The run's HParams plugin data by tag ({} for a run without any)."""
    try:
        return accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    except KeyError:
        return {}


def text(accumulator: EventAccumulator, tag: str) -> str:
    return accumulator.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def legend_and_tick_labels(figure) -> list[str]:
    labels = []
    for ax in figure.axes:
        legend = ax.get_legend()
        labels += [t.get_text() for t in legend.get_texts()] if legend else []
        labels += [t.get_text() for t in ax.get_yticklabels()]
    for legend in figure.legends:
        labels += [t.get_text() for t in legend.get_texts()]
    return labels


def test_labels_put_what_tells_combinations_apart_first_budgets_as_written_parts_directory_safe():
    from research.report.labels import combination_labels

    vanilla = Combination("vanilla", "-", None)
    ablation = [vanilla] + [Combination("text_prior", schedule, 64.0) for schedule in
                            ("layers[1-10-20/32]", "random(seed=0)", "uniform(num_stages=3,start=1)")]
    assert list(combination_labels(ablation).values()) == [
        "vanilla", "layers[1-10-20_of32]/text_prior/64", "random(seed=0)/text_prior/64",
        "uniform(num_stages=3,start=1)/text_prior/64"]
    scorers = [Combination("fastv", "layers[2]", budget, scorer_params={"query": "all"})
               for budget in (64.0, 0.3333, 128.0)] + [Combination("text_prior", "layers[2]", 64.0)]
    assert list(combination_labels(scorers).values()) == [  # 3 budgets, then 2 scorers, then the constant
        "64/fastv(query=all)/layers[2]", "0.3333/fastv(query=all)/layers[2]", "128/fastv(query=all)/layers[2]",
        "64/text_prior/layers[2]"]
    own = [Combination("text_prior", "layers[2]", 64.0),
           Combination("text_prior", "layers[2]", 64.0, positions="compact", own_positions=True)]
    assert list(combination_labels(own).values()) == ["original/text_prior/layers[2]/64",
                                                      "compact/text_prior/layers[2]/64"]


@pytest.fixture(scope="module")
def sweep(micro_model, tmp_path_factory):
    """A tiny sweep (one scorer, four schedules: a parametrized one and two seeded ones), its figures recorded as
    they are logged: ``(out, rows, {tag: [figure, ...]})``."""
    tmp = tmp_path_factory.mktemp("tb_view")
    experiment = tmp / "tb_view.yaml"
    experiment.write_text("scorers: [text_prior]\n" + textwrap.dedent(SCHEDULES) + "budgets: [48]\n")
    figures: dict[str, list] = {}
    original = SummaryWriter.add_figure

    def recording(self, tag, figure, *args, **kwargs):
        figures.setdefault(tag, []).append(figure)
        return original(self, tag, figure, *args, **{**kwargs, "close": False})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SummaryWriter, "add_figure", recording)
        rows = run(load_config([f"experiment={experiment}", f"model.path={micro_model}", f"output_dir={tmp}", *FAST]))
    assert [r["status"] for r in rows] == ["ok"] * 5
    return tmp / "tb_view", rows, figures


@pytest.mark.slow
def test_one_hparams_experiment_with_every_parameter(sweep):
    out, rows, _ = sweep
    logged = runs(out / "tensorboard")
    holders = [name for name, run_events in logged.items()
               if hparams_metadata.EXPERIMENT_TAG in hparams_content(run_events)]
    assert holders == ["summary"], holders
    content = logged["summary"].PluginTagToContent("hparams")[hparams_metadata.EXPERIMENT_TAG]
    experiment = hparams_metadata.parse_experiment_plugin_data(content)
    names = {info.name for info in experiment.hparam_infos}
    assert {"combination", "scorer", "schedule", "schedule.layers", "schedule.num_stages", "schedule.start",
            "schedule.seed", "budget"} <= names, names
    shown = {info.name for info in experiment.hparam_infos if info.differs}
    assert {"scorer", "schedule"} <= shown and len(shown) <= 5  # TensorBoard shows the first 5, those first
    assert {"metrics/accuracy", "metrics/flops_ratio"} <= {m.name.tag for m in experiment.metric_infos}


@pytest.mark.slow
def test_run_names_hparams_values_and_legends_share_one_label(sweep):
    out, rows, figures = sweep
    logged = runs(out / "tensorboard")
    combinations = {}
    for name, run_events in logged.items():
        content = hparams_content(run_events)
        if hparams_metadata.SESSION_START_INFO_TAG in content:
            start = hparams_metadata.parse_session_start_info_plugin_data(
                content[hparams_metadata.SESSION_START_INFO_TAG])
            combinations[name] = start.hparams["combination"].string_value
    assert len(combinations) == 5 and all(name == value for name, value in combinations.items()), combinations
    assert "vanilla" in combinations
    assert all(" " not in name and '"' not in name and ".0/" not in name for name in combinations), combinations
    curves = [label.split(" = ")[0] for f in figures["tokens_per_layer"] for label in legend_and_tick_labels(f)]
    assert set(combinations) <= set(curves), (sorted(combinations), curves)


@pytest.mark.slow
def test_no_per_layer_curve_is_a_scalar_series(sweep):
    out, _, figures = sweep
    for name, run_events in runs(out / "tensorboard").items():
        for tag in run_events.Tags()["scalars"]:
            steps = [event.step for event in run_events.Scalars(tag)]
            assert len(steps) == 1, (name, tag, steps)
        if name not in ("summary", "calibration"):
            assert {"tokens_per_layer", "dynamics/relevant_recall"} <= set(run_events.Tags()["images"]), name
    assert {"tokens_per_layer", "dynamics/relevant_recall"} <= set(runs(out / "tensorboard")["summary"].Tags()[
        "images"])


@pytest.mark.slow
def test_summary_text_table_has_one_row_per_combination(sweep):
    out, rows, _ = sweep
    summary = runs(out / "tensorboard")["summary"]
    tables = [text(summary, tag) for tag in summary.Tags()["tensors"] if tag.endswith("text_summary")]
    assert len(tables) == 1, summary.Tags()["tensors"]
    lines = [line for line in tables[0].splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(rows), tables[0]
    assert "combination" in lines[0] and "status" in lines[0] and "shift layers" in lines[0]


STATISTICS = {"accuracy_ratio": 0.9, "accuracy_ci_low": 0.1, "accuracy_ci_high": 0.9, "delta_vs_vanilla": -0.05,
              "delta_ci_low": -0.2, "delta_ci_high": 0.1, "accuracy_ratio_ci_low": 0.5, "accuracy_ratio_ci_high": 1.5,
              "p_vs_vanilla": 0.5, "reference": "", "p_vs_ref": "", "significant_vs_ref": "", "same_plan_as": ""}


@pytest.mark.slow
def test_statistics_columns_show_once_after_resume_and_old_run_names_move(sweep, micro_model, monkeypatch):
    """The lead's statistics columns (built here by hand) reach each run's ``metrics/`` scalars once even after a
    resume, the figures' error bars and the table; a reused result logged under the old name is moved."""
    out, rows, _ = sweep
    import research.report.board as board_module

    log_summary_run = board_module.log_summary_run

    def with_statistics(out, rows, *args, **kwargs):
        return log_summary_run(out, [{**row, **STATISTICS} for row in rows], *args, **kwargs)

    monkeypatch.setattr(board_module, "log_summary_run", with_statistics)
    result_file = out / "results" / "text_prior__layers0-2__b48.json"
    result = json.loads(result_file.read_text())
    board = out / "tensorboard"
    today = board / result["run"]
    old = board / "text_prior" / "layers0-2" / "b48"  # the name runs had before the labels
    shutil.move(today, old)
    del result["run"]
    result_file.write_text(json.dumps(result))

    figures: dict[str, list] = {}
    original = SummaryWriter.add_figure

    def recording(self, tag, figure, *args, **kwargs):
        figures.setdefault(tag, []).append(figure)
        return original(self, tag, figure, *args, **{**kwargs, "close": False})

    monkeypatch.setattr(SummaryWriter, "add_figure", recording)
    config = load_config([f"experiment={out.parent / 'tb_view.yaml'}", f"model.path={micro_model}",
                          f"output_dir={out.parent}", *FAST])
    run(config)
    run(config)  # the statistics again: replaced, not added
    assert not old.exists() and (today / "hparams.yaml").is_file()
    assert json.loads(result_file.read_text())["run"] == today.relative_to(board).as_posix()
    logged = runs(board)
    for name, run_events in logged.items():
        if name in ("summary", "calibration") or name == "vanilla":
            continue
        scalars = run_events.Tags()["scalars"]
        assert {"metrics/accuracy_ci_low", "metrics/p_vs_vanilla", "metrics/delta_vs_vanilla"} <= set(scalars), name
        assert [e.value for e in run_events.Scalars("metrics/accuracy_ci_low")] == [pytest.approx(0.1)], name
    ratio = figures["accuracy_ratio"][-1].axes[0]
    bars = [label.get_text().split("\n")[0] for label in ratio.get_yticklabels()]  # the micro model's vanilla: 0
    assert sorted(bars) == sorted(name for name in logged if name not in ("summary", "calibration", "vanilla"))
    assert any(getattr(c, "errorbar", None) is not None for c in ratio.containers), "no error bars"
    summary = logged["summary"]
    table = next(text(summary, t) for t in summary.Tags()["tensors"] if t.endswith("text_summary"))
    assert "[0.1, 0.9]" in table, table


def test_summary_table_cells_and_statistics_of_either_layout():
    from research.report.board import run_statistics, summary_table

    rows = [
        {"accuracy": 0.514, "accuracy_ci_low": 0.49, "accuracy_ci_high": 0.54, "accuracy_ratio": 0.9,
         "accuracy_ratio_ci_low": 0.85, "accuracy_ratio_ci_high": 0.95, "delta_vs_vanilla": -0.06, "delta_ci_low": "",
         "p_vs_vanilla": 0.012, "reference": "random(seed=0)/text_prior/64", "p_vs_ref": 0.4,
         "significant_vs_ref": "no", "same_plan_as": "single(layer=1)/text_prior/64", "status": "ok",
         "shift_layers": "3 4"},
        {"accuracy": "", "status": "failed", "error": "ValueError: a | b", "shift_layers": ""},  # no statistics
    ]
    lines = summary_table(rows, ["random(seed=2)/text_prior/64", "broken/text_prior/64"]).splitlines()
    assert lines[2].split(" | ")[1:] == [
        "0.514 [0.49, 0.54]", "0.9 [0.85, 0.95]", "-0.06", "0.012", "random(seed=0)/text_prior/64", "0.4 (n.s.)",
        "single(layer=1)/text_prior/64", "ok", "3 4 |"]
    assert "failed: ValueError: a \\| b" in lines[3] and len(lines) == 4
    assert run_statistics(rows[0], "") == {"accuracy_ci_low": 0.49, "accuracy_ci_high": 0.54,
                                           "delta_vs_vanilla": -0.06, "accuracy_ratio_ci_low": 0.85,
                                           "accuracy_ratio_ci_high": 0.95, "p_vs_vanilla": 0.012, "p_vs_ref": 0.4}
    assert run_statistics(rows[1], "") == {}
    assert run_statistics({"mme_ci_low": 0.1, "mme_ci_high": "", "mme_p_vs_vanilla": 0.03, "pope_ci_low": 0.5},
                          "mme") == {"accuracy_ci_low": 0.1, "p_vs_vanilla": 0.03}
