"""Scorer maths on hand-built examples, and the contract every registered scorer must keep."""

from __future__ import annotations

import pytest
import torch
from tiny import NUM_IMAGE_TOKENS, tiny_inputs, tiny_llava

from research.pruning import PruningEngine, PruningPlan
from research.pruning.signals import TokenLayout
from scorers import SCORERS, Scorer
from scorers.static_prompt import select_raters
from scorers.text_prior import text_prior_scores


def test_text_prior_reproduces_eq_2_to_4_by_hand():
    # Three question tokens, four vision tokens (one sample). Rows = queries.
    t2t = torch.tensor([[0.50, 0.00, 0.00],
                        [0.20, 0.30, 0.00],
                        [0.10, 0.40, 0.20]])
    t2v = torch.tensor([[0.10, 0.20, 0.05, 0.15],
                        [0.00, 0.10, 0.30, 0.10],
                        [0.05, 0.00, 0.10, 0.15]])
    # Eq. 2, by hand: w = column sums = [0.8, 0.7, 0.2].
    # Eq. 3, by hand: s_v = 0.8*t2v[0, v] + 0.7*t2v[1, v] + 0.2*t2v[2, v]
    expected = torch.tensor([0.090, 0.230, 0.270, 0.220])
    scores = text_prior_scores(t2t[None], t2v[None])[0]
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    # Eq. 4: the top-2 vision tokens are 2 and 1 (0.27, 0.23).
    assert scores.topk(2).indices.tolist() == [2, 1]


def test_static_prompt_raters_are_tokens_at_or_above_mean_relevance():
    # Vision embeddings all point along x; text token 0 is along x (relevant), 1 along y, 2 is padding.
    vision = torch.tensor([[[4.0, 0.0], [3.0, 0.0]]])
    text = torch.tensor([[[4.0, 0.0], [0.0, 4.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, False]])
    assert select_raters(text, vision, valid).tolist() == [[True, False, False]]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava(), tiny_inputs([5, 9, 7])


def locations_for(scorer_cls: type[Scorer]) -> list[int]:
    return [-1] if scorer_cls.pre_llm else [1, 3]


@pytest.mark.parametrize("name", SCORERS.names())
def test_scorer_contract(tiny, name):
    """Shape [B, V], finite, deterministic under a seed, budget respected, for every registered scorer."""
    model, inputs = tiny
    scorer_cls = SCORERS.get(name)
    locations = locations_for(scorer_cls)
    keep = [24, 10][: len(locations)]
    seen: list[torch.Tensor] = []

    class Spy:
        def __init__(self, inner: Scorer) -> None:
            self.inner = inner

        def score(self, signals):
            scores = self.inner.score(signals)
            assert scores.shape == (3, signals.num_vision)
            assert torch.isfinite(scores).all()
            seen.append(scores)
            return scores

    kept = []
    for _ in range(2):
        with torch.no_grad(), PruningEngine(model, Spy(scorer_cls()), PruningPlan.of(locations, keep)) as engine:
            model(**inputs)
        record = engine.last
        assert record.tokens_per_layer == PruningPlan.of(locations, keep).tokens_per_layer(6, NUM_IMAGE_TOKENS)
        assert [k.shape for k in record.kept] == [(3, n) for n in keep]
        for stage in record.kept:  # distinct, ascending, and really vision tokens
            assert (stage.diff(dim=1) > 0).all()
            assert (inputs["input_ids"].gather(1, stage) == 3).all()
        kept.append(record.kept)
    assert len(seen) == 2 * len(locations)
    for first, second in zip(kept[0], kept[1]):
        assert torch.equal(first, second)


def test_random_scorer_seed_changes_the_draw():
    layout = TokenLayout(
        vision=torch.arange(64).expand(2, -1), vision_orig=torch.arange(64).expand(2, -1),
        text=torch.zeros(2, 1, dtype=torch.long), text_valid=torch.ones(2, 1, dtype=torch.bool),
        valid=torch.ones(2, 64, dtype=torch.bool),
    )

    class Stub:
        stage = 0

    stub = Stub()
    stub.layout = layout
    draws = [SCORERS.get("random")(seed=s).score(stub) for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
