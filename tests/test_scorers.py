"""Scorer maths on hand-built examples, and the contract every registered scorer must keep."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import NUM_IMAGE_TOKENS, row, tiny_inputs, tiny_llava
from transformers import AutoConfig, AutoModel

from research.models import adapter_for
from research.pruning import PruningEngine, PruningPlan
from research.pruning.signals import InterfaceSignals, TokenLayout
from research.shapes_model.vocab import build_tokenizer
from scorers import SCORERS, Scorer
from scorers.atp import atp_scores
from scorers.mixture import mixture_scores, peakedness
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


@pytest.fixture(scope="module")
def deep_tower():
    """The tiny LLaVA with a 4-layer vision tower: enough layers for ``tome`` to merge 64 tokens down to 10."""
    return tiny_llava(vision_layers=4)


def model_for(name: str, tiny, deep_tower):
    """(model, inputs) a scorer runs on: the tiny LLaVA, its deep-tower twin for a scorer merging in the tower."""
    return (deep_tower, tiny[1]) if SCORERS.get(name).needs_vision_merging else tiny


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP (vision width = the tiny LLaVA's tower) and a word tokenizer, saved to disk."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=tokenizer.eos_token_id,
    )
    vision = tiny_llava().config.vision_config
    clip = AutoModel.from_config(AutoConfig.for_model("clip", text_config=text, vision_config=vision.to_dict(),
                                                      projection_dim=16))
    path = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_scorer(name: str, clip_dir: Path) -> Scorer:
    """A registered scorer with the configuration a test model needs (none for most)."""
    needs = {"atp": {"clip_path": str(clip_dir)}, "cdpruner": {"clip_path": str(clip_dir)}}
    return SCORERS.get(name)(**needs.get(name, {}))


def locations_for(scorer_cls: type[Scorer]) -> list[int]:
    return [-1] if scorer_cls.pre_llm else [1, 3]


@pytest.mark.parametrize("name", SCORERS.names())
def test_scorer_contract(tiny, deep_tower, tiny_clip_dir, name):
    """Shape [B, V], finite, deterministic under a seed, budget respected, for every registered scorer."""
    model, inputs = model_for(name, tiny, deep_tower)
    scorer_cls = SCORERS.get(name)
    locations = locations_for(scorer_cls)
    keep = [24, 10][: len(locations)]
    seen: list[torch.Tensor] = []

    class Spy:
        def __init__(self, inner: Scorer) -> None:
            self.inner = inner

        def __getattr__(self, name: str):  # what the engine reads of a scorer (e.g. needs_vision_merging)
            return getattr(self.inner, name)

        def score(self, signals):
            scores = self.inner.score(signals)
            assert scores.shape == (3, signals.num_vision)
            assert torch.isfinite(scores).all()
            seen.append(scores)
            return scores

    kept = []
    for _ in range(2):
        scorer = make_scorer(name, tiny_clip_dir)
        if hasattr(scorer, "bind"):
            scorer.bind(adapter_for(model))
        with torch.no_grad(), PruningEngine(model, Spy(scorer), PruningPlan.of(locations, keep)) as engine:
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
        vision_rank=torch.arange(64).expand(2, -1),
        text=torch.zeros(2, 1, dtype=torch.long), text_valid=torch.ones(2, 1, dtype=torch.bool),
        valid=torch.ones(2, 64, dtype=torch.bool),
    )

    class Stub:
        stage = 0

    stub = Stub()
    stub.layout = layout
    stub.memo = {}
    prompts = torch.stack([torch.arange(64), torch.arange(64).flip(0)])  # two samples: different prompts
    stub.interface = InterfaceSignals(torch.zeros(2, 64, 8), layout, input_ids=prompts)
    draws = [SCORERS.get("random")(seed=s).score(stub) for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0][0], draws[0][1])  # each sample its own draw
    stub.stage = 1
    assert not torch.equal(SCORERS.get("random")().score(stub), draws[0])  # and each stage


def test_atp_mixes_min_max_normalised_signals_by_hand():
    cls = torch.tensor([[0.1, 0.3, 0.2]])  # -> [0, 1, 0.5]
    sim = torch.tensor([[0.9, -0.1, 0.4]])  # -> [1, 0, 0.5]
    torch.testing.assert_close(atp_scores(cls, sim, alpha=0.75), torch.tensor([[0.25, 0.75, 0.5]]))


def test_atp_without_clip_model_says_what_to_configure(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="atp needs a CLIP text model .* set the scorer's clip_path"):
        PruningEngine(model, SCORERS.get("atp")(), PruningPlan.of([-1], [8]))


def test_mixture_weights_the_peaked_signal():
    flat = torch.full((1, 4), 0.25)
    peaked = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert peakedness(flat).item() == pytest.approx(0.0, abs=1e-6)
    assert peakedness(peaked).item() == pytest.approx(1.0, abs=1e-6)
    # the flat signal gets (almost) no weight: the mixture follows the peaked one
    torch.testing.assert_close(mixture_scores([flat, peaked]), peaked, atol=1e-5, rtol=0)


def test_cls_attention_equals_eager_vision_attentions():
    model = tiny_llava("eager")
    inputs = tiny_inputs([5])
    captured = {}

    class Capture:
        def score(self, signals):
            captured["cls"] = signals.cls_attention
            return signals.cls_attention

    with torch.no_grad(), PruningEngine(model, Capture(), PruningPlan.of([-1], [8])):
        model(**inputs)
    with torch.no_grad():
        out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = model.config.vision_feature_layer  # -2: the attentions of layers[-2]
    expected = out.attentions[layer][:, :, 0, 1:].mean(1)
    torch.testing.assert_close(captured["cls"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n in SCORERS.names() if SCORERS.get(n).pre_llm])
def test_interface_scorers_under_generate(tiny, deep_tower, tiny_clip_dir, name):
    """generate() encodes images before the model's forward: vision signals must still reach the scorer."""
    model, inputs = model_for(name, tiny, deep_tower)
    with torch.no_grad(), PruningEngine(model, make_scorer(name, tiny_clip_dir), PruningPlan.of([-1], [12])) as engine:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert engine.last.kept[0].shape == (3, 12)


@pytest.mark.parametrize("name", SCORERS.names())
def test_each_row_of_a_padded_batch_keeps_what_it_keeps_alone(tiny, deep_tower, tiny_clip_dir, name):
    """A scorer's kept set must not depend on the rest of the batch: in a left-padded batch of questions of
    different lengths (5, 9, 7 tokens), every row keeps the same image tokens as that row alone."""
    model, inputs = model_for(name, tiny, deep_tower)
    scorer_cls = SCORERS.get(name)
    plan = PruningPlan.of(locations_for(scorer_cls), [24, 10][: len(locations_for(scorer_cls))])

    def kept(batch: dict) -> list[torch.Tensor]:
        scorer = make_scorer(name, tiny_clip_dir)
        with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
            model(**batch)
        return engine.last.kept

    together = kept(inputs)
    padding = (inputs["attention_mask"] == 0).sum(1)
    assert len(set(padding.tolist())) == 3  # three different question lengths, three paddings
    differ = []  # (row, stage, Jaccard index of the two kept sets)
    for i in range(3):
        alone = kept(row(inputs, i))
        for stage, (batch_kept, alone_kept) in enumerate(zip(together, alone)):
            mine, own = set((batch_kept[i] - padding[i]).tolist()), set(alone_kept[0].tolist())
            if mine != own:
                differ.append((i, stage, round(len(mine & own) / len(mine | own), 2)))
    assert not differ, f"{name}: (row, stage, Jaccard) whose kept set differs from the row alone: {differ}"


def test_atp_text_embedding_of_a_padded_row_equals_the_row_alone(tiny_clip_dir):
    """The shapes tokenizer pads on the left; each question's pooled CLIP embedding in a batch of different
    lengths must equal its embedding alone (positions, EOS and the pooled slot as without padding)."""
    from scorers.atp import ClipText

    clip = ClipText(tiny_clip_dir, None)
    assert clip.tokenizer.padding_side == "left"
    texts = ["what color is the circle", "is there a red square left of the blue triangle", "how many"]
    together = clip.embed_texts(texts, torch.device("cpu"))
    alone = torch.cat([clip.embed_texts([text], torch.device("cpu")) for text in texts])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
