"""VisPruner keeps what its authors' code selects, on transformers' own tensors.

The reference is written here from Theia-4869/VisPruner (``llava/model/llava_arch.py``, ``encode_images``), batched
as their code runs, on the CLIP tower's eager attention weights (``output_attentions=True``) at LLaVA's feature
layer and, for the features its duplicate removal compares, the stand-in the scorer's ``features`` names (their
own, ``hidden_states[-2]``, is not captured by the engine: see the scorer's docstring).
"""

from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava

from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

QUESTIONS = [5, 11, 8]  # left padding on rows 0 and 2


def their_encode_images(image_features, image_attentions, visual_token_num: int, important_ratio: float):
    """``encode_images``'s selection, verbatim in its steps: (B, T) indices of the kept patches."""
    B = image_features.shape[0]
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    image_attentions = image_attentions.mean(dim=1)
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    rounds = 0
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = (a @ b.transpose(-1, -2)).max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]], dim=-1)
        rounds += 1
    assert diverse_token_num == 0 or rounds > 1  # the matching really ran
    if diverse_token_num > 0:
        return torch.cat([important_indices, residual_indices], dim=-1)
    return important_indices


@pytest.fixture(scope="module")
def eager():
    return tiny_llava("eager"), tiny_inputs(QUESTIONS)


def tower_features(model, pixel_values, features: str):
    """(patch features the scorer compares, the CLS rows of the feature layer's attention [B, H, N])."""
    out = model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    attentions = out.attentions[-2][:, :, 0, 1:]  # feature_select: select_layer -2, 'patch'
    if features == "projected":
        return model.model.multi_modal_projector(out.hidden_states[-2][:, 1:]), attentions
    return out.hidden_states[-1][:, 1:], attentions  # the tower's last hidden state


def kept(model, inputs, scorer, keep):
    with torch.no_grad(), PruningEngine(model, scorer, PruningPlan.of([-1], [keep])) as engine:
        model(**inputs)
    return engine.last


@pytest.mark.parametrize("keep,ratio,features", [
    (32, 0.5, "projected"), (32, 0.75, "projected"), (32, 0.5, "tower_last"), (20, 0.0, "projected"),
    (16, 1.0, "projected"),
])
def test_vispruner_kept_tokens_equal_their_code(eager, keep, ratio, features):
    """Per row of a left-padded batch of 3: the kept patches equal ``encode_images``'s (Jaccard 1.0)."""
    model, inputs = eager
    record = kept(model, inputs, SCORERS.get("vispruner")(important_ratio=ratio, features=features), keep)
    with torch.no_grad():
        image_features, image_attentions = tower_features(model, inputs["pixel_values"], features)
    theirs = their_encode_images(image_features, image_attentions, keep, ratio)
    padding = (inputs["attention_mask"] == 0).sum(1).tolist()
    for b in range(3):
        image = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero()[:, 0]
        got = record.kept[0][b]
        expected = image[theirs[b]]
        assert set(got[got >= 0].tolist()) == set(expected.tolist()) and len(set(expected.tolist())) == keep, b
        assert int(image[0]) == padding[b] + 4  # BOS and a 3-token prefix before the image


def test_vispruner_diverse_tokens_are_not_the_next_by_attention(eager):
    """A negative control: the duplicate removal changes the set (it is not the top-k by CLS attention)."""
    model, inputs = eager
    record = kept(model, inputs, SCORERS.get("vispruner")(), 32)
    top = kept(model, inputs, SCORERS.get("vispruner")(important_ratio=1.0), 32)
    assert not torch.equal(record.kept[0], top.kept[0])


def test_vispruner_odd_residual_keeps_the_budget(eager):
    """Their loop fails on an odd residual; here the same rule keeps exactly the budget (64 - 15 = 49 residual)."""
    model, inputs = eager
    record = kept(model, inputs, SCORERS.get("vispruner")(important_ratio=0.6), 25)
    assert (record.kept[0] >= 0).sum(1).tolist() == [25, 25, 25]


def test_vispruner_bad_options_fail_in_one_line():
    with pytest.raises(ValueError, match=r"important_ratio 1.5 is outside \[0, 1\]"):
        SCORERS.get("vispruner")(important_ratio=1.5)
    with pytest.raises(ValueError, match=r"features 'hidden' unknown; choose one of \['projected', 'tower_last'\]"):
        SCORERS.get("vispruner")(features="hidden")
