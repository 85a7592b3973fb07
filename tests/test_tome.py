"""ToMe in the vision tower (``scorers/tome.py``, ``research/pruning/vision_merge.py``, ``token_merge.py``):
fidelity to the authors' code, the merge properties on every family that supports it, the refusal of the others,
and the r-per-layer solver."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch

from research.models import FAMILIES, UnsupportedModel, adapter_for
from research.models.base import vision_merging_refusal
from research.models.testing import random_inputs, random_model
from research.pruning import PruningEngine, PruningPlan
from research.pruning.token_merge import parse_r, solve_r, tokens_after
from scorers import SCORERS

MERGING = [name for name in FAMILIES.names() if FAMILIES.get(name).supports_vision_merging]
NOT_MERGING = [name for name in FAMILIES.names() if not FAMILIES.get(name).supports_vision_merging]
QUESTIONS = [5, 9, 7]


@cache
def model(family: str):
    """Tiny models; LLaVA-1.5's tower 4 layers deep, so merges reach small budgets."""
    return random_model(family, num_layers=4, num_kv_heads=2, vision_layers=4 if family == "llava15" else None)


@cache
def inputs(family: str) -> dict[str, torch.Tensor]:
    return random_inputs(model(family), QUESTIONS)


def image_tokens(family: str) -> int:
    return FAMILIES.get(family).vision_layout(model(family).config).image_tokens


# ---- the authors' code, transcribed (facebookresearch/ToMe af95e4b: tome/merge.py, tome/patch/timm.py) ------
def reference_bipartite_soft_matching(metric, r, class_token=False):
    protected = 1 if class_token else 0
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode=None: x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def reference_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


@torch.no_grad()
def reference_tower(vlm, pixel_values, schedule, carry_sizes, prop_attn):
    """ToMeBlock.forward / ToMeAttention.forward on the CLIP layers that feed LLaVA's features: the merged
    features (CLS dropped) and the patches each holds. ``carry_sizes=False`` is LightCompress's
    ``merge_wavg(merge, hidden_states)`` (sizes 1 in every layer)."""
    tower = vlm.model.vision_tower
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    size, count = None, torch.ones_like(x[..., :1])
    for layer, r in zip(tower.encoder.layers, schedule):
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        batch, tokens, width = h.shape
        q, k, v = (proj(h).view(batch, tokens, attn.num_heads, -1).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if prop_attn and count.shape[1] < 1 + image_tokens("llava15"):
            logits = logits + count.log()[:, None, None, :, 0]
        x = x + attn.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, width))
        if r > 0:
            merge = reference_bipartite_soft_matching(k.mean(1), r, class_token=True)
            x, new_size = reference_merge_wavg(merge, x, size if carry_sizes else None)
            size = new_size if carry_sizes else None
            count = merge(count, mode="sum")
        x = x + layer.mlp(layer.layer_norm2(x))
    return x[:, 1:], count[:, 1:, 0]


class Spy:
    """A scorer wrapper that keeps what the scorer saw at the interface."""

    def __init__(self, inner) -> None:
        self.inner, self.sizes = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, signals):
        self.sizes.append(signals.interface.merged_sizes)
        return self.inner.score(signals)


SETTINGS = {  # name: (scorer params, plan keep)
    "tome_solved": ({}, 20),
    "lightcompress_solved": ({"reading": "lightcompress"}, 20),
    "tome_r0_in_some_layers": ({"r": [0, 20, 0, 0]}, 44),
    "lightcompress_tuple": ({"reading": "lightcompress", "r": 12, "r_step": 2.0}, 22),  # 12, 14, 16 (+18 unused)
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_merged_features_and_sizes_equal_the_authors_code(setting):
    params, keep = SETTINGS[setting]
    vlm, batch = model("llava15"), inputs("llava15")
    scorer = Spy(SCORERS.get("tome")(**params))
    features = []
    hook = adapter_for(vlm).projector.register_forward_pre_hook(lambda module, args: features.append(args[0]))
    try:
        with torch.no_grad(), PruningEngine(vlm, scorer, PruningPlan.of([-1], [keep])) as engine:
            vlm(**batch)
    finally:
        hook.remove()
    options = scorer.merge_options(adapter_for(vlm).vision_merge_sites(), keep)
    authors = params.get("reading", "tome") == "tome"  # ToMe: sizes carried, proportional attention; else neither
    expected, sizes = reference_tower(vlm, batch["pixel_values"], options.schedule, authors, authors)
    assert features[0].shape == expected.shape == (3, keep, expected.shape[-1])
    torch.testing.assert_close(features[0], expected, atol=1e-5, rtol=0)
    held = scorer.sizes[0]  # [B, V]: placement "merge" puts the k tokens in the image's first k slots
    torch.testing.assert_close(held[:, :keep], sizes, atol=1e-5, rtol=0)
    assert (held[:, keep:] == 0).all()
    assert engine.last.tokens_per_layer == [keep] * 4


def test_spatial_placement_puts_each_merged_token_at_its_first_patch():
    vlm, batch = model("llava15"), inputs("llava15")
    scorer = Spy(SCORERS.get("tome")(placement="spatial"))
    with torch.no_grad(), PruningEngine(vlm, scorer, PruningPlan.of([-1], [20])) as engine:
        vlm(**batch)
    held = scorer.sizes[0]
    assert ((held > 0).sum(1) == 20).all() and (held.sum(1) == image_tokens("llava15")).all()
    kept = engine.last.kept[0]
    image_start = (batch["input_ids"] == 3).float().argmax(1, keepdim=True)
    assert torch.equal((kept - image_start)[:, 0], torch.zeros(3, dtype=torch.long))  # patch 0 leads a group


# ---- merge properties, on every family that supports the merge ------------------------------------------
def greedy(family: str, batch: dict, scorer, plan: PruningPlan, steps: int = 3):
    with torch.no_grad(), PruningEngine(model(family), scorer, plan) as engine:
        out = model(family).generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1), engine.last


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("family", MERGING)
def test_cached_decode_after_the_merge_equals_no_cache_recompute(family, positions):
    batch, plan = inputs(family), PruningPlan.of([-1], [20], positions=positions)
    tokens, cached, record = greedy(family, batch, SCORERS.get("tome")(), plan)
    recomputed = []
    for t in range(tokens.shape[1]):
        grown = dict(batch, input_ids=torch.cat([batch["input_ids"], tokens[:, :t]], 1),
                     attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(tokens[:, :t])], 1))
        with torch.no_grad(), PruningEngine(model(family), SCORERS.get("tome")(), plan, replay=record.kept):
            recomputed.append(model(family)(**grown, use_cache=False).logits[:, -1])
    torch.testing.assert_close(cached, torch.stack(recomputed, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", MERGING)
def test_a_row_of_a_padded_batch_equals_the_row_alone(family):
    batch, plan = inputs(family), PruningPlan.of([-1], [20])
    tokens, logits, record = greedy(family, batch, SCORERS.get("tome")(), plan)
    mask = batch["attention_mask"].bool()
    padding = (~mask).sum(1)
    for i in range(3):
        alone = {key: batch[key][i][mask[i]][None] for key in ("input_ids", "attention_mask")}
        alone["pixel_values"] = batch["pixel_values"][i : i + 1]
        alone_tokens, alone_logits, alone_record = greedy(family, alone, SCORERS.get("tome")(), plan)
        assert torch.equal(record.kept[0][i] - padding[i], alone_record.kept[0][0])
        assert torch.equal(tokens[i], alone_tokens[0])
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", MERGING)
def test_merged_tokens_in_single_slots_equal_the_drop_of_the_empty_slots(family):
    """At the interface every merged token is a group of one slot: the merge stage equals a plain drop stage
    (the engine's replay of the same kept slots) on the same placed features, within 1e-6."""
    vlm, batch, plan = model(family), inputs(family), PruningPlan.of([-1], [20])
    placed = []
    projector = adapter_for(vlm).projector
    with torch.no_grad(), PruningEngine(vlm, SCORERS.get("tome")(), plan) as engine:
        hook = projector.register_forward_hook(lambda module, args, output: placed.append(output))
        merged = vlm(**batch).logits
        hook.remove()
    hook = projector.register_forward_hook(lambda module, args, output: placed[0])
    try:
        with torch.no_grad(), PruningEngine(vlm, SCORERS.get("random")(), plan, replay=engine.last.kept):
            dropped = vlm(**batch).logits
    finally:
        hook.remove()
    assert placed[0].shape[1] == image_tokens(family)
    torch.testing.assert_close(merged, dropped, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", MERGING)
def test_full_budget_is_bitwise_vanilla(family):
    vlm, batch = model(family), inputs(family)
    with torch.no_grad():
        vanilla = vlm.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    tokens, logits, record = greedy(family, batch, SCORERS.get("tome")(), PruningPlan.of([-1], [image_tokens(family)]))
    assert torch.equal(logits, torch.stack(vanilla.logits, 1))
    assert torch.equal(tokens, vanilla.sequences[:, batch["input_ids"].shape[1]:])


def test_r_zero_in_a_layer_is_no_merge_there():
    sites = adapter_for(model("llava15")).vision_merge_sites()
    assert SCORERS.get("tome")(r=[0, 20, 0, 0]).schedule(sites, 44) == [0, 20, 0]


# ---- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", NOT_MERGING)
def test_a_family_that_cannot_merge_in_its_tower_is_refused_in_one_line(family):
    adapter = FAMILIES.get(family)
    message = vision_merging_refusal(adapter, "tome")
    assert "\n" not in message and family in message and adapter.no_vision_merging in message
    assert str(MERGING) in message
    with pytest.raises(UnsupportedModel) as caught:
        PruningEngine(model(family), SCORERS.get("tome")(), PruningPlan.of([-1], [0.5], relative=True))
    assert str(caught.value) == message


def test_tome_runs_at_the_interface_only_and_refuses_unreachable_budgets():
    vlm = model("llava15")
    with pytest.raises(ValueError, match=r"one stage at location -1 .* got locations \[1\]"):
        PruningEngine(vlm, SCORERS.get("tome")(), PruningPlan.of([1], [20]))
    with pytest.raises(ValueError, match="no fewer than 8, not 4"):
        PruningEngine(vlm, SCORERS.get("tome")(), PruningPlan.of([-1], [4]))
    with pytest.raises(ValueError, match=r"r=16 \(tome reading\) merges the tower to 16 image tokens"):
        PruningEngine(vlm, SCORERS.get("tome")(r=16), PruningPlan.of([-1], [20]))
    with pytest.raises(ValueError, match="reading 'timm' unknown; choose one of"):
        SCORERS.get("tome")(reading="timm")


# ---- the r-per-layer solver -------------------------------------------------------------------------------
def test_solver_reaches_every_reachable_keep_exactly_on_llava15_shapes():
    tokens, layers = 577, 23  # CLIP ViT-L/14-336 with CLS; hidden_states[-2] = 23 layers
    for keep in range(0, 577):
        try:
            schedule = solve_r(tokens, keep, layers, protected=1)
        except ValueError:
            assert keep < 8  # only budgets below what halving 23 times leaves are refused
            continue
        assert len(schedule) == layers and tokens_after(tokens, schedule, 1)[-1] == keep + 1
    assert solve_r(577, 64, 23, 1) == [22] * 17 + [23] * 6  # constant r, the remainder in the last layers


def test_r_readings_follow_each_codebase():
    def tome_parse_r(num_layers, r):  # facebookresearch/ToMe tome/utils.py parse_r
        inflect = 0
        if isinstance(r, tuple):
            r, inflect = r
        min_val = int(r * (1.0 - inflect))
        max_val = 2 * r - min_val
        step = (max_val - min_val) / (num_layers - 1)
        return [int(min_val + step * i) for i in range(num_layers)]

    assert parse_r(24, (16, -1.0)) == tome_parse_r(24, (16, -1.0))
    assert parse_r(24, (16, 0.5)) == tome_parse_r(24, (16, 0.5))
    assert parse_r(24, (16, -1.0), "lightcompress") == [max(int(16 - i), 0) for i in range(24)]
    assert parse_r(3, [4, 5]) == [4, 5, 0]
    assert 576 - sum(parse_r(24, 16)[:23]) == 208  # LightCompress's r=16 on LLaVA-1.5
