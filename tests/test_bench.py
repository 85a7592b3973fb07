"""``python -m research.bench``: the scorers before the LLM timed at several image-token counts (structure only:
no assertion here depends on how fast anything runs)."""

from __future__ import annotations

import pytest

from research.bench import (
    BUDGETS,
    format_interface,
    grid_model,
    interface_scorers,
    interface_section,
    main,
    refused_scorers,
)
from research.models.testing import random_inputs


@pytest.mark.slow
def test_every_scorer_before_the_llm_is_timed_at_each_count_with_its_growth_cdpruner_and_atp_included():
    counts = [36, 144]  # 6x6 and 12x12 CLIP grids: the bench's 576 -> 2,916 (24x24 -> 54x54), made small
    section = interface_section("llava15", counts, repetitions=1, num_layers=1)

    assert section["skipped"] == {}  # atp and cdpruner get the bench's random CLIP text tower
    assert {"atp", "cdpruner", "divprune"} <= set(interface_scorers())
    assert section["image_tokens"] == counts and set(section["vanilla_ms"]) == set(counts)
    names = {f"{scorer}@{budget}" for scorer in interface_scorers() for budget in BUDGETS}
    for count in counts:
        assert set(section["variants"][count]) == names
    for scorer in interface_scorers():  # the same shares of the image tokens: 192 / 64 of 576
        assert section["variants"][36][f"{scorer}@192"]["keep"] == 12
        assert section["variants"][144][f"{scorer}@64"]["keep"] == 16
    assert set(section["growth"]) == names
    for name, growth in section["growth"].items():
        low, high = (section["variants"][n][name] for n in counts)
        assert growth["image_tokens"] == counts and growth["keep"] == [low["keep"], high["keep"]]
        assert growth["share_growth"] == pytest.approx(
            high["scoring_fraction_of_vanilla"] / low["scoring_fraction_of_vanilla"])
        assert growth["scoring_time_growth"] == pytest.approx(high["scoring_ms"] / low["scoring_ms"])
        assert low["scoring_ms"] > 0 and high["scoring_ms"] > 0
    report = format_interface(section)
    assert all(any(line.strip().startswith(name) and "growth: share" in line for line in report) for name in names)


def test_the_large_count_is_a_real_54x54_clip_grid_of_2916_image_tokens():
    model = grid_model("llava15", 2916, num_layers=1)
    assert model.config.vision_config.image_size == 54 * 14
    inputs = random_inputs(model, [40])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2916
    assert tuple(inputs["pixel_values"].shape[-2:]) == (756, 756)


@pytest.mark.parametrize("argv, message", [
    (["--image-tokens", "576,2880"], "image tokens 2880 is not a square grid; choose a square, e.g. 2809 (53x53) "
                                     "or 2916 (54x54)"),
    (["--image-tokens", "576,many"], "give comma-separated integers"),
    (["--family", "qwen2_vl", "--image-tokens", "576"], "--image-tokens needs a square-grid family; 'qwen2_vl' "
                                                        "is not one: choose one of ['llava15']"),
])
def test_bad_image_token_counts_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_a_family_without_a_square_grid_is_refused_other_counts():
    with pytest.raises(ValueError, match="'qwen2_vl' is not one; choose one of \\['llava15'\\]"):
        grid_model("qwen2_vl", 576)


def test_the_scorers_a_family_refuses_are_listed_not_run():
    refused = refused_scorers("qwen2_vl")  # no CLS attention mapped onto its image tokens
    assert {"atp", "cdpruner", "visionzip", "vispruner", "mixture"} <= set(refused)
    assert "divprune" not in refused and "CLS attention" in refused["atp"] and "patch states" in refused["cdpruner"]
    assert refused_scorers("llava15") == {}
