"""DivPrune keeps the tokens its authors' code keeps.

The reference is written here from vbdi/divprune (``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``
and ``DivPrune``, the ``LAYER_INDEX == '0'`` branch that sorts the kept indices), run per sample as their code runs
(batch of one) on what transformers itself computes: the projected image features the LLM receives
(``model.get_image_features(...).pooler_output``), never on this framework's signals.
"""

from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, tiny_inputs, tiny_llava

from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS
from scorers.divprune import max_min_order, padded_distances

QUESTIONS = [5, 11, 8]  # left padding on rows 0 and 2


# ---- the reference, from their code ---------------------------------------------------------------


def their_divprune(visual_feature_vectors: torch.Tensor, image_feature_length: int, threshold_ratio: float):
    """``LlavaMetaForCausalLM.DivPrune``: the chosen indices ``s`` in choice order."""
    threshold_terms = int(round(threshold_ratio * image_feature_length))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
        if i == 0:
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(m2, dim=0).values
        s[i] = torch.argmax(scores)
    return s


# ---- fidelity --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava("eager"), tiny_inputs(QUESTIONS)


def kept_and_scores(model, inputs, plan: PruningPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's kept input positions [B, k] and the scores DivPrune gave [B, V]."""
    scorer, seen = SCORERS.get("divprune")(), []
    score = scorer.score
    scorer.score = lambda signals: seen.append(score(signals)) or seen[-1]
    with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
        model(**inputs)
    return engine.last.kept[0], seen[0]


@pytest.mark.parametrize("keep", [8, 20, 63])
def test_divprune_keeps_what_their_code_keeps_on_a_left_padded_batch(tiny, keep):
    """Per row: their greedy on transformers' projected image features, sorted kept indices, Jaccard 1.0;
    and the scores rank the chosen tokens in their choice order."""
    model, inputs = tiny
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    kept, scores = kept_and_scores(model, inputs, PruningPlan.of([-1], [keep]))
    jaccards, orders = [], []
    for b in range(3):
        s = their_divprune(features[b], features[b].shape[0], keep / features[b].shape[0])
        columns = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero()[:, 0]
        theirs = set(columns[s.sort().values].tolist())
        mine = set(kept[b].tolist())
        jaccards.append(len(mine & theirs) / len(mine | theirs))
        orders.append(torch.equal(scores[b].topk(keep).indices, s))
    assert jaccards == [1.0] * 3, f"Jaccard per row: {jaccards}"
    assert orders == [True] * 3


def test_divprune_without_the_plans_count_orders_every_token_with_the_same_prefix(tiny):
    """``score`` alone (no ``keep_counts``) orders all tokens; the greedy's first k do not depend on k."""
    model, inputs = tiny
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    valid = torch.ones(3, features[0].shape[0], dtype=torch.bool)
    full = max_min_order(padded_distances(torch.stack(list(features)), valid), valid, valid.shape[1])
    assert [sorted(row.tolist()) for row in full] == [list(range(valid.shape[1]))] * 3  # a permutation
    for b in range(3):
        assert torch.equal(full[b, :20], their_divprune(features[b], features[b].shape[0], 20 / features[b].shape[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divprune_ties_and_dtype_fall_as_in_their_code(dtype):
    """Duplicate tokens (exact ties in every step) and low-precision distances (computed in the features'
    dtype, as theirs): the same choices in the same order, first index on ties; a padded row as if alone."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 16, generator=g)
    features = torch.cat([base, base[[3, 7, 0, 3]], torch.randn(20, 16, generator=g)]).to(dtype)  # 36 tokens
    n = features.shape[0]
    padded = torch.cat([torch.zeros(4, 16, dtype=dtype), features])[None]  # 4 padding entries first
    valid = torch.cat([torch.zeros(4, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])[None]
    order = max_min_order(padded_distances(padded, valid), valid, 30)[0] - 4
    assert torch.equal(order, their_divprune(features, n, 30 / n))


def test_divprune_needs_no_cls_and_acts_before_the_llm():
    cls = SCORERS.get("divprune")
    assert cls.pre_llm and not cls.needs_cls_saliency and not cls.needs_llm_attention
