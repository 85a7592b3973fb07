"""The summary's statistics on a real sweep (micro model): intervals, differences and p-values re-derived from the
predictions files by hand, the reference each combination is tested against, seeds, identical plans, and the
one-line refusals of bad settings."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from research.config import ConfigError, load_config
from research.run import run
from research.statistics import BootstrapSettings, compare, holm, mcnemar_p, mean_units

FAST = ["data.limit=40", "eval.batch_size=40", "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=0",
        "eval.analysis_samples=0", "eval.bootstrap=999"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, list[dict], str]:
    """The shipped default model (the micro one answers nothing right: every difference would be 0)."""
    tmp = tmp_path_factory.mktemp("significance")
    experiment = tmp / "stats_sweep.yaml"
    experiment.write_text(textwrap.dedent("""\
        scorers: [text_prior, fastv, {name: random, seeds: [0, 1]}]
        schedules: [{name: single, layer: 1}, {name: layers, layers: [1]}]
        budgets: [36]
        """))
    out = tmp / "runs"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(load_config([f"experiment={experiment}", f"output_dir={out}", *FAST]))
    with (out / "stats_sweep" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    return out / "stats_sweep", rows, printed.getvalue()


def units_of(directory: Path, row: dict, rows: list[dict]) -> object:
    """The 0/1 scores of a row's combination, read back from its predictions file by hand."""
    name = next(p for p in (directory / "predictions").glob("*.jsonl") if _matches(p.stem, row))
    records = [json.loads(line) for line in name.read_text().splitlines()]
    return mean_units([r["id"] for r in records], [float(r["correct"]) for r in records])


def _matches(stem: str, row: dict) -> bool:
    if row["scorer"] == "vanilla":
        return stem == "vanilla"
    schedule = row["schedule"].replace("(", "").replace(")", "").replace("[", "").replace("]", "")
    return stem.startswith(row["scorer"].replace("(", "").replace(")", "")) and schedule in stem


@pytest.mark.slow
def test_intervals_differences_and_holm_p_values_match_a_derivation_from_the_predictions(sweep):
    directory, rows, _ = sweep
    vanilla = units_of(directory, rows[0], rows)
    assert float(rows[0]["accuracy_ci_low"]) <= float(rows[0]["accuracy"]) <= float(rows[0]["accuracy_ci_high"])
    assert rows[0]["p_vs_vanilla"] == rows[0]["delta_vs_vanilla"] == ""
    raw = []
    for row in rows[1:]:
        own = units_of(directory, row, rows)
        assert float(row["accuracy"]) == pytest.approx(own.value(), abs=1e-4)
        comparison = compare(own, vanilla, BootstrapSettings(resamples=999))
        assert float(row["delta_vs_vanilla"]) == pytest.approx(comparison.delta.value, abs=1e-4)
        assert float(row["delta_ci_low"]) == pytest.approx(comparison.delta.low, abs=1e-4)
        assert float(row["delta_ci_high"]) == pytest.approx(comparison.delta.high, abs=1e-4)
        assert float(row["accuracy_ratio_ci_low"]) <= float(row["accuracy_ratio"]) <= float(
            row["accuracy_ratio_ci_high"])
        raw.append(mcnemar_p(own, vanilla))
    for row, adjusted in zip(rows[1:], holm(raw)):
        assert float(row["p_vs_vanilla"]) == pytest.approx(adjusted, rel=1e-2)
        assert row["significant_vs_vanilla"] == ("yes" if adjusted < 0.05 else "no")


@pytest.mark.slow
def test_each_combination_is_tested_against_random_at_its_schedule_and_budget(sweep):
    directory, rows, _ = sweep
    by_label = {(r["scorer"], r["schedule"]): r for r in rows}
    text_prior = by_label["text_prior", "single(layer=1)"]
    assert "random(seed=0)" in text_prior["reference"] and "single(layer=1)" in text_prior["reference"]
    reference = by_label["random(seed=0)", "single(layer=1)"]
    assert reference["reference"] == "" and reference["p_vs_ref"] == ""  # a reference is not tested against itself
    own, ref = units_of(directory, text_prior, rows), units_of(directory, reference, rows)
    assert float(text_prior["delta_vs_ref"]) == pytest.approx(own.value() - ref.value(), abs=1e-4)
    tested = [r for r in rows if r["p_vs_ref"] != ""]
    assert len(tested) == 4  # text_prior and fastv at two schedules
    raw = [mcnemar_p(units_of(directory, r, rows), units_of(directory, by_label["random(seed=0)", r["schedule"]],
                                                                       rows)) for r in tested]
    assert [float(r["p_vs_ref"]) for r in tested] == pytest.approx(holm(raw), rel=1e-2)


@pytest.mark.slow
def test_seeds_expand_and_report_their_mean_and_spread_identical_plans_are_named(sweep):
    directory, rows, printed = sweep
    seeded = [r for r in rows if r["scorer"].startswith("random(")]
    assert [r["scorer"] for r in seeded] == ["random(seed=0)"] * 2 + ["random(seed=1)"] * 2
    for schedule in ("single(layer=1)", "layers[1]"):
        group = [r for r in seeded if r["schedule"] == schedule]
        values = [float(r["accuracy"]) for r in group]
        for r in group:
            assert int(r["seeds_n"]) == 2
            assert float(r["seeds_mean"]) == pytest.approx(np.mean(values), abs=1e-4)
            assert float(r["seeds_sd"]) == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert all(r["seeds_n"] == "" for r in rows if not r["scorer"].startswith("random("))
    # single(layer=1) and layers[1] run the identical plan: each layers[1] row names its single(layer=1) twin
    for row in rows[1:]:
        twin = row["schedule"] == "layers[1]"
        assert bool(row["same_plan_as"]) == twin
        if twin:
            assert "single(layer=1)" in row["same_plan_as"] and row["scorer"] in row["same_plan_as"]
            first = next(r for r in rows if r["scorer"] == row["scorer"] and r["schedule"] == "single(layer=1)")
            assert row["accuracy"] == first["accuracy"]  # one result serves both
    markdown = (directory / "summary.md").read_text()
    assert "timing: statistics" in markdown and "% of the combinations'" in printed
    assert "(n.s.)" in markdown or "p=" in markdown


@pytest.mark.parametrize("override, message", [
    ("eval.bootstrap=-1", "eval.bootstrap=-1 out of range"),
    ("eval.confidence=1.5", "eval.confidence=1.5 out of range"),
    ("eval.interval=normal", "unknown eval.interval 'normal'; choose one of ['BCa', 'percentile', 'basic']"),
    ("reference={model: x}", "reference must be a scorer name or a mapping of ['scorer', 'schedule', 'budget']"),
    ("scorers=[{name: fastv, seeds: [0, 1]}]", "scorer 'fastv' takes no seed, so 'seeds' does not apply"),
    ("scorers=[{name: random, seeds: [0, 0]}]", "seeds must be a non-empty list of distinct integers"),
])
def test_bad_statistics_settings_are_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as error:
        load_config(["experiment=main_table", override])
    assert "\n" not in str(error.value)


def test_a_named_reference_that_matches_several_is_refused_before_loading_and_one_that_matches_none_is_said(
        caplog):
    from research.experiment import resolve
    from research.sweep import plan_sweep

    cfg = load_config(["experiment=main_table", "scorers=[text_prior, {name: random, seeds: [0, 1]}]",
                       "reference=random"])
    with pytest.raises(ConfigError, match="matches 2 combinations"):
        plan_sweep(resolve(cfg), allow_pending=True)
    cfg = load_config(["experiment=main_table", "scorers=[text_prior, {name: random, seeds: [0, 1]}]",
                       "reference=random(seed=1)"])
    combos = plan_sweep(resolve(cfg), allow_pending=True)
    assert {c.reference for c in combos if c.scorer == "text_prior"} == {
        "randomseed=1__layers1-10-20_of32__b32", "randomseed=1__layers1-10-20_of32__b16"}
    # the default experiment names the paper's locations; with its schedules overridden nothing is tested against
    # them: the sweep runs and says so once (its final plan), rather than stopping
    cfg = load_config(["experiment=ablation_locations", "schedules=[{name: single, layer: 1}]"])
    combos = plan_sweep(resolve(cfg))
    assert not any(c.reference for c in combos)
    assert "reference (schedule=layers[1-10-20/32]) matches no combination of this sweep" in caplog.text


def test_the_terminal_table_and_summary_md_mark_a_difference_to_the_reference_that_is_not_significant(tmp_path):
    from research.report.summary import compact_table, write_summary

    base = {"schedule": "layers[1]", "budget": 36.0, "flops_ratio": 0.5, "status": "ok", "error": "",
            "accuracy_ratio": 0.9}
    rows = [
        {**base, "scorer": "text_prior", "accuracy": 0.9, "accuracy_ci_low": 0.85, "accuracy_ci_high": 0.94,
         "reference": "random / layers[1] / 36", "delta_vs_ref": 0.01, "p_vs_ref": 0.41, "significant_vs_ref": "no"},
        {**base, "scorer": "fastv", "accuracy": 0.97, "accuracy_ci_low": 0.95, "accuracy_ci_high": 0.99,
         "reference": "random / layers[1] / 36", "delta_vs_ref": 0.08, "p_vs_ref": 0.0004,
         "significant_vs_ref": "yes"},
    ]
    lines = compact_table(rows).splitlines()
    assert lines[0].split()[-2:] == ["ref", "status"] and "95% CI" in lines[0]
    assert "0.85-0.94" in lines[1] and " n.s. " in lines[1] and "p=0.0004" in lines[2] and "n.s." not in lines[2]
    write_summary(tmp_path, rows)
    markdown = (tmp_path / "summary.md").read_text()
    assert "0.9 [0.85, 0.94]" in markdown
    assert "random / layers[1] / 36: +0.01, p=0.41 (n.s.)" in markdown and "+0.08, p=0.0004 |" in markdown


def test_the_statistics_settings_do_not_make_finished_results_stale():
    """Intervals are recomputed from the predictions at every summary: changing them must not re-run anything."""
    from research.experiment import resolve
    from research.resume import fingerprint
    from research.sweep import plan_sweep

    keys = []
    for settings in ([], ["eval.bootstrap=0", "eval.confidence=0.9", "eval.interval=percentile", "reference=fastv"],
                     ["eval.overlays=1"]):
        experiment = resolve(load_config(["experiment=main_table", "scorers=[text_prior, fastv]", *settings]))
        keys.append(fingerprint(experiment, plan_sweep(experiment, allow_pending=True)[1], "weights"))
    assert keys[0] == keys[1] and keys[0]["config"] != keys[2]["config"]  # an eval setting of the run does count
