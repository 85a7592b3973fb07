"""FLOPs estimates (AdaptInfer Eq. 5-7) against hand-computed values and the paper's magnitudes."""

from __future__ import annotations

import pytest
from tiny import IMAGE_SIZE, NUM_IMAGE_TOKENS, PATCH_SIZE, tiny_llava

from research.models.llava import LlavaAdapter
from research.pruning.plan import PruningPlan
from research.report.flops import (
    FlopsReport,
    decode_layer_flops,
    estimate_flops,
    flops_for_model,
    prefill_layer_flops,
    prune_flops,
    vision_tower_flops,
)

# LLaVA-1.5-7B: LLaMA-7B backbone, 576 vision tokens.
D, M, LAYERS, VISION, TEXT = 4096, 11008, 32, 576, 64


def test_prefill_layer_eq5_by_hand() -> None:
    # n=3, d=2, m=5: 4*3*2^2 + 2*3^2*2 + 3*3*2*5 = 48 + 36 + 90
    assert prefill_layer_flops(3, 2, 5) == 174.0


def test_prune_eq6_by_hand() -> None:
    # T=3, V=4: 3^2 + 2*3*4 = 9 + 24
    assert prune_flops(3, 4) == 33.0
    assert prune_flops(0, 100) == 0.0


def test_decode_layer_eq7_by_hand() -> None:
    # n=3, d=2, m=5: 4*2^2 + 2*3*2 + 3*2*5 = 16 + 12 + 30
    assert decode_layer_flops(3, 2, 5) == 58.0


def test_vision_tower_by_hand() -> None:
    # 3 patches + CLS -> n=4, d=2, m=5, 2 layers: 2 * (4*4*2^2 + 2*4^2*2 + 2*4*2*5) = 2 * (64 + 64 + 80)
    assert vision_tower_flops(3, 2, 5, 2) == 416.0


def test_estimate_composes_the_equations() -> None:
    # 3 layers on 4, 4, 1 vision tokens after pruning at layer 1 (which sees V=4); T=3, d=2, m=5.
    report = estimate_flops([4, 4, 1], 3, 2, 5, [1], vision=(3, 2, 5, 2), decode_tokens=1)
    # prefill: Eq.5(n=7) twice + Eq.5(n=4) + Eq.6(T=3, V=4)
    eq5_n7 = 4 * 7 * 4 + 2 * 49 * 2 + 3 * 7 * 2 * 5  # 112 + 196 + 210 = 518
    eq5_n4 = 4 * 4 * 4 + 2 * 16 * 2 + 3 * 4 * 2 * 5  # 64 + 64 + 120 = 248
    assert report.prefill == 2 * eq5_n7 + eq5_n4 + 33
    # decode: cache of 3 + V + 1 tokens per layer -> Eq.7(n=8) twice + Eq.7(n=5)
    eq7_n8 = 4 * 4 + 2 * 8 * 2 + 3 * 2 * 5  # 16 + 32 + 30 = 78
    eq7_n5 = 4 * 4 + 2 * 5 * 2 + 3 * 2 * 5  # 16 + 20 + 30 = 66
    assert report.decode_per_token == 2 * eq7_n8 + eq7_n5
    assert report.vision == 416.0
    assert report.total_prefill == report.prefill + report.vision


def test_vanilla_llava_7b_prefill_matches_paper_magnitude() -> None:
    # Table 3 reports 4.2-4.6 TFLOPs for vanilla LLaVA-1.5-7B including its vision tower and extras;
    # the LLM part alone: 32 * (4*640*4096^2 + 2*640^2*4096 + 3*640*4096*11008) ~ 4.25e12.
    report = estimate_flops([VISION] * LAYERS, TEXT, D, M, [])
    assert 3.0e12 < report.prefill < 5.0e12
    assert report.vision == 0.0
    assert report.total_prefill == report.prefill


def test_fewer_tokens_lower_the_estimate_monotonically() -> None:
    vision = (VISION, 1024, 4096, 24)
    totals = []
    for keep in (576, 288, 192, 128, 64, 32, 0):
        plan = PruningPlan.of([1, 10, 20], [keep, keep, keep // 2])
        report = estimate_flops(plan.tokens_per_layer(LAYERS, VISION), TEXT, D, M, plan.locations, vision=vision)
        totals.append((report.total_prefill, report.decode_per_token))
    prefill, decode = zip(*totals)
    assert all(a > b for a, b in zip(prefill, prefill[1:]))
    assert all(a > b for a, b in zip(decode, decode[1:]))


@pytest.mark.parametrize("plan", [PruningPlan.of([], []), PruningPlan.of([-1], [VISION])])
def test_full_budget_ratio_is_exactly_one(plan: PruningPlan) -> None:
    vanilla = estimate_flops([VISION] * LAYERS, TEXT, D, M, [], vision=(VISION, 1024, 4096, 24))
    full = estimate_flops(plan.tokens_per_layer(LAYERS, VISION), TEXT, D, M, plan.locations, (VISION, 1024, 4096, 24))
    assert full.ratio_to(vanilla) == 1.0
    assert full == vanilla


def test_interface_location_adds_no_prune_term() -> None:
    tokens = [64] * LAYERS
    assert estimate_flops(tokens, TEXT, D, M, [-1]) == estimate_flops(tokens, TEXT, D, M, [])
    # an in-LLM location at the same token counts adds exactly Eq. 6
    diff = estimate_flops(tokens, TEXT, D, M, [3]).prefill - estimate_flops(tokens, TEXT, D, M, []).prefill
    assert diff == prune_flops(TEXT, 64)


def test_ratio_to() -> None:
    a = FlopsReport(prefill=1.0, vision=1.0, decode_per_token=5.0, total_prefill=2.0)
    b = FlopsReport(prefill=3.0, vision=1.0, decode_per_token=7.0, total_prefill=4.0)
    assert a.ratio_to(b) == 0.5


def test_out_of_range_location_raises() -> None:
    with pytest.raises(ValueError, match="out of range"):
        estimate_flops([4, 4], 3, 2, 5, [2])


def test_flops_for_model_reads_the_adapter() -> None:
    adapter = LlavaAdapter(tiny_llava(num_layers=2))
    report = flops_for_model(adapter, [NUM_IMAGE_TOKENS, 16], 5, [0])
    vision = ((IMAGE_SIZE // PATCH_SIZE) ** 2, 32, 64, 2)  # tiny CLIP: hidden 32, intermediate 64, 2 layers
    assert report == estimate_flops([NUM_IMAGE_TOKENS, 16], 5, 64, 128, [0], vision=vision)
    assert report.vision == vision_tower_flops(*vision)
    with pytest.raises(ValueError, match="2-layer"):
        flops_for_model(adapter, [NUM_IMAGE_TOKENS], 5, [])
