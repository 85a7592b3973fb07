"""Schedule contract tests over every registered schedule, the budget solver and the paper's settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from research.pruning.plan import PruningPlan
from schedules import COUNTING, SCHEDULES, Schedule, solve_budget

NUM_VISION = 576
# Defaults that legitimately need a deeper LLM: the paper's [1, 10, 20] needs >= 21 layers.
# Below that the default must raise the range error, not return locations.
MIN_LAYERS = {"layers": 21}


def _shift_histogram(num_layers: int) -> list[int]:
    """Paper-shaped: an early spike, then a dense middle region."""
    counts = [0] * num_layers
    counts[1] = 50
    for layer in range(num_layers // 3, 2 * num_layers // 3):
        counts[layer] = 20
    return counts


# Entries whose default instance needs an input a real run provides (a calibration histogram).
CONFIGURE = {"changepoint": lambda num_layers: {"histogram": _shift_histogram(num_layers)},
             "listed": lambda num_layers: {"layers": [1, num_layers // 2], "counts": {144: [200, 100],
                                                                                       288: [400, 200]}}}


def make(name: str, num_layers: int) -> Schedule:
    return SCHEDULES.get(name)(**CONFIGURE.get(name, lambda n: {})(num_layers))


@pytest.mark.parametrize("num_layers", [8, 16, 32])
@pytest.mark.parametrize("name", SCHEDULES.names())
def test_default_locations_contract(name: str, num_layers: int) -> None:
    cls = SCHEDULES.get(name)
    schedule = make(name, num_layers)
    assert isinstance(schedule, Schedule)
    if num_layers < MIN_LAYERS.get(name, 0):
        with pytest.raises(ValueError, match="out of range"):
            schedule.locations(num_layers)
        return
    locs = schedule.locations(num_layers)
    assert locs and all(isinstance(x, int) for x in locs)
    assert locs == sorted(set(locs))
    lowest = -1 if cls.allows_interface else 0
    assert all(lowest <= x < num_layers for x in locs)
    assert make(name, num_layers).locations(num_layers) == locs  # deterministic


@pytest.mark.parametrize("fraction", [0.25, 0.5])
@pytest.mark.parametrize("num_layers", [8, 16, 32])
@pytest.mark.parametrize("name", SCHEDULES.names())
def test_default_solve_contract(name: str, num_layers: int, fraction: float) -> None:
    schedule = make(name, num_layers)
    if num_layers < MIN_LAYERS.get(name, 0):
        schedule = SCHEDULES.get(name)(layers=[1, num_layers // 2])
    if not schedule.solves_any_target:  # a method's own lists: the listed budgets only, averaging what they give
        fraction = round(fraction * 4) / 4
    locs = schedule.locations(num_layers)
    # Layers before the first location always count all tokens ("post"): aim above that (at it, every
    # stage would keep 0 tokens, which the solver refuses).
    floor = max(locs[0], 0) * NUM_VISION / num_layers
    target = max(fraction * NUM_VISION, floor + 2)
    budget = schedule.solve(num_layers, NUM_VISION, target)
    assert budget.locations == tuple(locs)
    assert list(budget.keep) == sorted(budget.keep, reverse=True)
    assert all(0 <= k <= NUM_VISION for k in budget.keep)
    if schedule.solves_any_target:
        assert abs(budget.reported_avg - target) <= 1


@pytest.mark.parametrize("target", [64, 128])
def test_paper_schedule_hits_target(target: int) -> None:
    budget = solve_budget([1, 10, 20], 32, NUM_VISION, target)
    assert abs(budget.reported_avg - target) <= 1
    assert budget.counting == "post"
    # A pruning layer runs at its pre-pruning size, so more tokens ran than the papers' count.
    assert budget.computed_avg > budget.reported_avg
    assert budget.computed_avg == sum(budget.tokens_per_layer()) / 32
    assert budget.reported_avg == sum(budget.tokens_per_layer("post")) / 32
    assert budget.tokens_per_layer() == budget.plan().tokens_per_layer(32, NUM_VISION)
    assert isinstance(budget.plan("compact"), PruningPlan)


@pytest.mark.parametrize("counting", COUNTING)
def test_counting_conventions(counting: str) -> None:
    budget = solve_budget([1, 10, 20], 32, NUM_VISION, 64, counting=counting)
    assert abs(budget.reported_avg - 64) <= 1
    post = budget.tokens_per_layer("post")
    pre = budget.tokens_per_layer("pre")
    assert post[:1] == [NUM_VISION] and pre[:2] == [NUM_VISION, NUM_VISION]
    assert pre[1:] == post[:-1]  # "pre" lags "post" by one layer


def test_interface_location_counts_equal() -> None:
    budget = solve_budget([-1], 32, NUM_VISION, 64)
    assert budget.keep == (64,)
    assert budget.computed_avg == budget.reported_avg == 64


def test_full_budget_keeps_everything() -> None:
    budget = solve_budget([1, 10, 20], 32, NUM_VISION, NUM_VISION)
    assert budget.keep == (NUM_VISION,) * 3
    assert budget.reported_avg == budget.computed_avg == NUM_VISION


def test_target_above_vision_tokens() -> None:
    with pytest.raises(ValueError, match="576"):
        solve_budget([1, 10, 20], 32, NUM_VISION, 700)


def test_negative_target() -> None:
    with pytest.raises(ValueError, match="-1"):
        solve_budget([1, 10, 20], 32, NUM_VISION, -1)


def test_location_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[32\].*-1 \.\. 31"):
        solve_budget([1, 10, 32], 32, NUM_VISION, 64)
    with pytest.raises(ValueError, match=r"\[40\].*0 \.\. 31"):
        SCHEDULES.get("single")(layer=40).locations(32)
    with pytest.raises(ValueError, match="strictly increasing"):
        solve_budget([10, 1], 32, NUM_VISION, 64)


def test_unknown_counting() -> None:
    with pytest.raises(ValueError, match=r"'mean'.*\['post', 'pre'\]"):
        solve_budget([1, 10, 20], 32, NUM_VISION, 64, counting="mean")


def test_unreachable_target() -> None:
    # Layers 0..9 always keep all 576 tokens: the minimum "post" average is 10 * 576 / 32 = 180.
    with pytest.raises(ValueError, match="minimum average is 180"):
        solve_budget([10, 20], 32, NUM_VISION, 64)


def test_bad_ratio() -> None:
    with pytest.raises(ValueError, match="ratio"):
        solve_budget([1, 10, 20], 32, NUM_VISION, 64, ratio=0)
    with pytest.raises(ValueError, match="ratio"):
        SCHEDULES.get("uniform")(ratio=1.5)


def test_uniform_paper_settings() -> None:
    uniform = SCHEDULES.get("uniform")
    assert uniform(num_stages=3, start=2).locations(32) == [2, 12, 22]
    assert uniform(num_stages=4, start=0, step=9).locations(32) == [0, 9, 18, 27]
    with pytest.raises(ValueError, match="out of range"):
        uniform(num_stages=4, start=0, step=11).locations(32)


def test_random_is_seeded() -> None:
    random_schedule = SCHEDULES.get("random")
    assert random_schedule(seed=3).locations(32) == random_schedule(seed=3).locations(32)
    draws = {tuple(random_schedule(seed=seed).locations(32)) for seed in range(5)}
    assert len(draws) > 1
    for locs in draws:
        assert 1 <= len(locs) <= 4 and all(1 <= x <= 30 for x in locs)


def test_calibration_prints_and_logs_the_layers_of_the_entrys_own_parameters(tmp_path, monkeypatch, capsys) -> None:
    """A changepoint entry with non-default ``level`` / ``early_fraction``: the layers printed and logged after
    calibration are those the entry runs with (by default the histogram gives [1, 2]; at level 0.6, [2])."""
    import research.analysis.collect as collect
    from research.calibration import calibrate
    from research.config import load_config
    from research.experiment import resolve
    from research.output import SweepOutput
    from research.sweep import plan_sweep
    from schedules.changepoint import changepoint_layers

    histogram = [0, 5, 10, 3]
    assert changepoint_layers(histogram) == [1, 2]
    logged = {}
    monkeypatch.setattr(collect, "attention_shift_histogram", lambda *args, **kwargs: torch.tensor(histogram))
    monkeypatch.setattr(collect, "log_shift_histogram",
                        lambda writer, counts, layers, tag, source: logged.__setitem__(tag, (layers, source)))
    cfg = load_config([f"output_dir={tmp_path}", "scorers=[text_prior]", "budgets=[100]",
                       "schedules=[{name: changepoint, samples: 2, level: 0.6, early_fraction: 0.5}]"])
    experiment = resolve(cfg)
    histograms = calibrate(experiment, None, None, SweepOutput.of(experiment))  # the model is not run
    four_layers = dataclasses.replace(experiment.model, num_layers=len(histogram))
    four_layers = dataclasses.replace(experiment, model=four_layers)
    assert [c.locations for c in plan_sweep(four_layers, histograms) if not c.is_vanilla] == [[2]]
    # the calibration run says what it shows, on which split and how many samples
    assert logged == {"changepoint_schedule_0": ([2], "schedules[0]: attention-shift histogram of 2 samples of split "
                                                      f"{experiment.data.calibration_split!r}")}
    assert "prune after layers [2]" in capsys.readouterr().out


def test_listed_keeps_the_counts_a_method_lists_scaled_to_the_model():
    """SparseVLM's main lists (post-merge totals, scorers/sparsevlm.py) at layers 2, 6, 15 of 32: on LLaVA-1.5 as
    listed, on a 144-token model each count a quarter, a budget a quarter; an unlisted budget one line."""
    listed = SCHEDULES.get("listed")(layers=[2, 6, 15], counts={192: [309, 204, 113], 64: [82, 32, 18]})
    budget = listed.solve(32, 576, 192)
    assert budget.locations == (2, 6, 15) and budget.keep == (309, 204, 113)
    assert budget.reported_avg == (2 * 576 + 4 * 309 + 9 * 204 + 17 * 113) / 32 == 192.03125  # post counting
    assert listed.solve(32, 144, 16).keep == (20, 8, 4)  # 64 of 576 -> 16 of 144: 82/4, 32/4, 18/4 rounded
    shallow = SCHEDULES.get("listed")(layers=[2, 6, 15], scale_from=32, counts={128: [312, 117, 39]})
    eight = shallow.solve(8, 144, 32)  # at another depth the lists average another budget: scaled together
    assert eight.locations == (1, 2, 4) and abs(eight.reported_avg - 32) <= 1
    assert eight.keep[0] / eight.keep[1] == pytest.approx(312 / 117, rel=0.1)
    with pytest.raises(ValueError, match=r"listed counts cover budgets \['16', '48'\] of 144 image tokens") as caught:
        listed.solve(32, 144, 32)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="one count per layer"):
        SCHEDULES.get("listed")(layers=[2, 6], counts={192: [309, 204, 113]})
