"""VisionZip keeps and merges what its authors' code selects, on transformers' own tensors.

The reference is written here from dvlab-research/VisionZip (``visionzip/clip_encoder.py``,
``CLIPVisionTower_VisionZip.forward``; keys from ``visionzip/utils.py``'s patched attention), batched as their
code runs, on the CLIP tower's eager attention weights (``output_attentions=True``), its hidden states and the keys
of its feature layer (``k_proj`` of that layer's ``layer_norm1`` input, averaged over heads).
"""

from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava

from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

QUESTIONS = [5, 11, 8]  # left padding on rows 0 and 2


def their_visionzip(attentions, hidden_states, metric, dominant_num: int, contextual_num: int):
    """``CLIPVisionTower_VisionZip.forward``'s selection: (dominant patch indices [B, d] (of the patches, ascending),
    contextual groups: per row a list of (target, joiners) patch indices)."""
    attn_weights, hidden = attentions[-2], hidden_states[-2]
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    position = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
    kept_positions = position[~mask].view(hidden.shape[0], dominant_num + 1)
    filtered_positions = position[mask].view(hidden.shape[0], hidden.shape[1] - (dominant_num + 1))
    metric_filtered = metric[mask].view(hidden.shape[0], hidden.shape[1] - (dominant_num + 1), metric.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
    assign = similarity.argmax(dim=2)  # [B, N - c]
    groups = []
    for b in range(hidden.shape[0]):
        targets, joiners = filtered_positions[b, target_indices], filtered_positions[b, others]
        groups.append([(int(t) - 1, (joiners[assign[b] == c] - 1).tolist()) for c, t in enumerate(targets)])
    return kept_positions[:, 1:] - 1, groups  # patch indices (CLS dropped: it is no image token here)


def tower_tensors(model, pixel_values):
    """The CLIP tower's eager attentions, hidden states and the feature layer's head-mean keys [B, T, hd]."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    layer = tower.vision_model.encoder.layers[-2] if hasattr(tower, "vision_model") else tower.encoder.layers[-2]
    attn = layer.self_attn
    keys = attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))  # the input of layers[-2] is hidden_states[-3]
    batch, tokens, _ = keys.shape
    metric = keys.view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2).mean(1)  # their _shape, mean(1)
    return out.attentions, out.hidden_states, metric


@pytest.fixture(scope="module")
def eager():
    return tiny_llava("eager"), tiny_inputs(QUESTIONS)


def engine_run(model, inputs, scorer, plan):
    """The pruned forward's record and decoder layer 0's input (the pruned sequence)."""
    first = {}
    layer0 = model.model.language_model.layers[0]
    handle = layer0.register_forward_pre_hook(lambda m, a, k: first.__setitem__("x", a[0] if a else
                                                                                k["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
            model(**inputs)
    finally:
        handle.remove()
    return engine.last, first["x"]


@pytest.mark.parametrize("counting,options,dominant,contextual", [
    ("lightcompress", {}, 27, 5),  # k = 32: c = round(5 * 32 / 32) = 5, d = 27 patches
    ("authors", {}, 26, 5),  # their visionzip(dominant=27): CLS + 26 patches
    ("lightcompress", {"contextual": 3}, 29, 3),
])
def test_visionzip_kept_and_merged_tokens_equal_their_code(eager, counting, options, dominant, contextual):
    """Per row of a left-padded batch of 3: the dominant patches, the contextual groups (their anchors) and the
    merged tokens (the engine's mean of the group's image embeddings) follow the repository's selection."""
    model, inputs = eager
    keep = 32
    plan = PruningPlan.of([-1], [keep])
    scorer = SCORERS.get("visionzip")(cls_counting=counting, **options)
    assert scorer.split(keep) == (dominant, contextual)
    record, pruned = engine_run(model, inputs, scorer, plan)
    with torch.no_grad():
        attentions, hidden_states, metric = tower_tensors(model, inputs["pixel_values"])
        features = model.model.multi_modal_projector(hidden_states[-2][:, 1:])  # the image embeddings
    dominant_patches, groups = their_visionzip(attentions, hidden_states, metric, dominant, contextual)
    padding = (inputs["attention_mask"] == 0).sum(1).tolist()
    multi_member = 0
    for b in range(3):
        ids = inputs["input_ids"][b, padding[b]:]
        image = (ids == IMAGE_TOKEN_ID).nonzero()[:, 0] + padding[b]  # input_ids indices of the patches
        num_text = len(ids) - int(image[-1] - padding[b]) - 1
        members = [sorted([target, *joiners]) for target, joiners in groups[b]]
        anchors = sorted(m[-1] for m in members)
        expected = sorted(dominant_patches[b].tolist() + anchors)
        assert len(expected) == dominant + contextual
        got = record.kept[0][b]
        assert set(got[got >= 0].tolist()) == set(image[expected].tolist())  # Jaccard 1.0
        assert got[got >= 0].tolist() == image[expected].tolist()
        got_anchors = record.merged[-1][b]
        assert got_anchors[got_anchors >= 0].tolist() == image[anchors].tolist()
        start = pruned.shape[1] - num_text - len(expected)
        for group in members:
            slot = start + expected.index(group[-1])
            torch.testing.assert_close(pruned[b, slot], features[b, group].mean(0), rtol=1e-5, atol=1e-6)
            multi_member += len(group) > 1
        assert sum(len(m) for m in members) == 64 - dominant  # every other patch is in one group
    assert multi_member > 0


def test_visionzip_splits_the_budget_as_their_settings():
    scorer = SCORERS.get("visionzip")()
    assert [scorer.split(k) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    authors = SCORERS.get("visionzip")(cls_counting="authors")
    assert [authors.split(k) for k in (64, 128, 192)] == [(53, 10), (107, 20), (161, 30)]
    assert scorer.split(32) == (27, 5) and scorer.split(100) == (84, 16)  # round(5 k / 32) contextual


@pytest.mark.parametrize("counting,tokens", [("lightcompress", 32), ("authors", 31)])
def test_visionzip_runs_on_the_budget_or_one_under_it(eager, counting, tokens):
    """The LLM runs on k image tokens (lightcompress) or k - 1 (authors: their CLS token is not inserted)."""
    model, inputs = eager
    record, _ = engine_run(model, inputs, SCORERS.get("visionzip")(cls_counting=counting), PruningPlan.of([-1], [32]))
    assert record.tokens_per_layer == [tokens] * 6
    assert (record.kept[0] >= 0).sum(1).tolist() == [tokens] * 3


def test_visionzip_keeps_everything_when_the_budget_holds_every_token(eager):
    model, inputs = eager
    record, _ = engine_run(model, inputs, SCORERS.get("visionzip")(), PruningPlan.of([-1], [64]))
    assert (record.kept[0] >= 0).sum(1).tolist() == [64] * 3 and (record.merged.get(-1) is None
                                                                  or (record.merged[-1] < 0).all())


def test_visionzip_bad_options_fail_in_one_line():
    with pytest.raises(ValueError, match=r"cls_counting 'cls' unknown; choose one of \['lightcompress', 'authors'\]"):
        SCORERS.get("visionzip")(cls_counting="cls")
    with pytest.raises(ValueError, match=r"contextual -1 is negative"):
        SCORERS.get("visionzip")(contextual=-1)
