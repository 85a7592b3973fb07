"""Paired intervals and tests (research.statistics) on synthetic scores with known answers, and every
benchmark's units (what the bootstrap resamples) giving exactly the metric the benchmark reports."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from research.data import DATASETS
from research.data.benchmark import scoring_of
from research.data.fixtures import WRITERS
from research.statistics import (
    BootstrapSettings,
    compare,
    f1_units,
    holm,
    interval,
    mcnemar_p,
    mean_ratio,
    mean_units,
    paired_p,
    permutation_p,
    stratified_sum_units,
)

FAST = BootstrapSettings(resamples=999)


def correlated_scores(rng: np.random.Generator, n: int, p_a: float, p_b: float) -> tuple[np.ndarray, np.ndarray]:
    """Two 0/1 scorings of the same n units that agree far more often than chance (as two pruning methods on one
    benchmark do): a shared uniform per unit, thresholded at each method's accuracy."""
    shared = rng.random(n)
    noise = rng.random(n) < 0.1
    a = (shared < p_a).astype(float)
    b = np.where(noise, rng.random(n) < p_b, shared < p_b).astype(float)
    return a, b


@pytest.mark.slow
def test_paired_intervals_cover_the_true_difference_at_the_nominal_rate():
    """100 seeded simulations of two methods at 0.80 and 0.75 on 1,200 shared units (the default experiment's
    size; true difference 0.05, true ratio 0.80 / 0.75): the 95% intervals of the difference and of the ratio
    cover the truth >= 93 times (over 300 seeds: 96%; at 400 units the bootstrap under-covers slightly, 94%)."""
    covered_delta = covered_ratio = 0
    ids = [str(i) for i in range(1200)]
    for seed in range(100):
        a, b = correlated_scores(np.random.default_rng(seed), 1200, 0.80, 0.75)
        result = compare(mean_units(ids, a), mean_units(ids, b), BootstrapSettings(resamples=999, seed=seed))
        covered_delta += result.delta.low <= 0.05 <= result.delta.high
        covered_ratio += result.ratio.low <= 0.80 / 0.75 <= result.ratio.high
    assert covered_delta >= 93 and covered_ratio >= 93, (covered_delta, covered_ratio)


def test_a_paired_interval_is_narrower_than_the_unpaired_one_when_methods_agree():
    """Pairing is what makes small differences visible: the paired interval of the difference is much narrower
    than what two independent intervals would give (so a test that ignores pairing would fail here)."""
    ids = [str(i) for i in range(600)]
    a, b = correlated_scores(np.random.default_rng(0), 600, 0.80, 0.75)
    paired_width = compare(mean_units(ids, a), mean_units(ids, b), FAST).delta
    ia, ib = interval(mean_units(ids, a), FAST), interval(mean_units(ids, b), FAST)
    unpaired = np.hypot(ia.high - ia.low, ib.high - ib.low)
    assert paired_width.high - paired_width.low < 0.75 * unpaired


def test_mcnemar_equals_binomtest_on_the_discordant_cells_of_the_two_by_two_table():
    # 2x2 table: both right 50, only a right 12, only b right 4, both wrong 34
    a = np.array([1] * 50 + [1] * 12 + [0] * 4 + [0] * 34, dtype=float)
    b = np.array([1] * 50 + [0] * 12 + [1] * 4 + [0] * 34, dtype=float)
    ids = [str(i) for i in range(100)]
    expected = stats.binomtest(12, 16, 0.5).pvalue  # by hand: 0.0768...
    assert mcnemar_p(mean_units(ids, a), mean_units(ids, b)) == pytest.approx(expected, rel=1e-12)
    assert paired_p(mean_units(ids, a), mean_units(ids, b), FAST) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.0768, abs=1e-4)


def test_identical_predictions_give_delta_zero_a_zero_width_interval_and_p_one():
    ids = [str(i) for i in range(300)]
    scores = (np.random.default_rng(1).random(300) < 0.7).astype(float)
    a, b = mean_units(ids, scores), mean_units(ids, scores.copy())
    result = compare(a, b, FAST)
    assert (result.delta.value, result.delta.low, result.delta.high) == (0.0, 0.0, 0.0)
    assert (result.ratio.value, result.ratio.low, result.ratio.high) == (1.0, 1.0, 1.0)
    assert mcnemar_p(a, b) == 1.0
    graded = mean_units(ids, np.random.default_rng(2).choice([0.0, 0.3, 0.6, 1.0], 300))  # VQA accuracy
    assert permutation_p(graded, graded, FAST) == 1.0


def test_units_are_paired_by_id_not_by_position():
    ids = [str(i) for i in range(200)]
    scores = (np.random.default_rng(3).random(200) < 0.6).astype(float)
    shuffled = np.random.default_rng(4).permutation(200)
    a = mean_units(ids, scores)
    b = mean_units([ids[i] for i in shuffled], scores[shuffled])  # the same scores, units listed in another order
    assert compare(a, b, FAST).delta.high == 0.0
    assert mcnemar_p(a, b) == 1.0


def test_mme_resamples_an_image_with_both_its_questions():
    """Every image has one question right and one wrong: accuracy 50, accuracy+ 0 on every resample of images.
    Resampling the questions on their own would make accuracy+ (both right) vary; resampling pairs cannot."""
    root_rows = []
    for image in range(40):
        for question, said in ((0, "yes"), (1, "yes")):
            root_rows.append({"id": f"{image}-{question}", "prediction": said, "answer": "yes" if question else "no",
                              "target": {"question_id": f"img{image}.png", "category": ["count", "OCR"][image % 2]}})
    mme = DATASETS.get("mme").__new__(DATASETS.get("mme"))  # scoring only: no snapshot needed
    mme.split = "test"
    units = mme.units(root_rows)["total"]
    assert len(units.ids) == 40  # images, not questions
    assert units.value() == pytest.approx(mme.score(root_rows)["total"]) == pytest.approx(2 * 50.0)
    estimate = interval(units, FAST)
    assert estimate.low == estimate.high == pytest.approx(100.0)
    split = stratified_sum_units([r["id"] for r in root_rows], [100.0 * (r["prediction"] == r["answer"])
                                 for r in root_rows], [r["target"]["category"] for r in root_rows])
    loose = interval(split, FAST)  # the same questions as independent units: the interval has width
    assert loose.high - loose.low > 5


def test_holm_adjusts_step_down_and_is_monotone():
    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06], nan_ok=True)
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([]) == []


def test_avg_ratio_resamples_each_benchmark_on_its_own():
    """Two benchmarks of different sizes: the interval of the mean ratio covers the true mean ratio at about the
    nominal rate over 40 simulations (>= 36), and a benchmark of identical scores adds no width."""
    covered = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        a1, b1 = correlated_scores(rng, 300, 0.70, 0.75)
        a2, b2 = correlated_scores(rng, 500, 0.90, 0.85)
        ids1, ids2 = [f"x{i}" for i in range(300)], [f"y{i}" for i in range(500)]
        estimate = mean_ratio([(mean_units(ids1, a1), mean_units(ids1, b1)),
                               (mean_units(ids2, a2), mean_units(ids2, b2))], BootstrapSettings(499, seed=seed))
        covered += estimate.low <= (0.70 / 0.75 + 0.90 / 0.85) / 2 <= estimate.high
    assert covered >= 36, covered
    same = mean_units(ids1, a1)
    assert mean_ratio([(same, same)], FAST).low == mean_ratio([(same, same)], FAST).high == 1.0


def test_f1_units_give_popes_f1():
    rng = np.random.default_rng(5)
    truth = rng.random(200) < 0.5
    said = np.where(rng.random(200) < 0.8, truth, ~truth)
    tp, fp, fn = said & truth, said & ~truth, ~said & truth
    units = f1_units([str(i) for i in range(200)], tp, fp, fn)
    assert units.value() == pytest.approx(100 * 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-lab")
    for write in WRITERS.values():
        write(root)
    return root


@pytest.mark.parametrize("name", sorted(WRITERS) + ["shapes"])
def test_every_benchmarks_units_give_the_metric_it_reports(snapshots, name):
    """On random right / wrong answers (20 draws), each metric with units is exactly ``score()``'s value."""
    factory = DATASETS.get(name)
    dataset = factory(size=40, split="test") if name == "shapes" else factory(root=str(snapshots))
    scoring = scoring_of(dataset)
    samples = list(dataset)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = [{"id": s.id, "answer": s.answer, "target": getattr(s, "target", None), "qtype": s.qtype,
                 "prediction": s.answer if rng.random() < 0.6 else "zebra"} for s in samples]
        reported = scoring.score(rows)
        units = scoring.units(rows)
        assert scoring.headline in units
        for metric, unit_scores in units.items():
            assert unit_scores.value() == pytest.approx(reported[metric]), metric
