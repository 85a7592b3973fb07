"""The baselines keep the tokens their authors' code keeps, and the paper protocols are expressible.

References are written here from the authors' code, on the attention weights transformers itself
returns (``output_attentions=True``, eager attention), never from this framework's signals:

* FastV (``modeling_llama.py``, ``fastv_forward``): layer K-1's weights, last query row, mean over
  heads, top-k of the image columns;
* PyramidDrop (``modeling_llama_pdrop.py``, ``pdrop_rank_drop``): the weights layer l+1 computes
  (with ``input_layernorm``, ``q_proj``, ``k_proj`` on layer l's output), last instruction token row,
  mean over heads, top-k of the image columns.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, plan, shaped, tiny_inputs, tiny_llava

from research.config import ConfigError, load_config
from research.pruning import PruningEngine, PruningPlan
from research.pruning.signals import Signals, TokenLayout
from schedules import SCHEDULES
from scorers import SCORERS

QUESTIONS = [5, 11, 8]  # left padding on rows 0 and 2
KEEP = 32  # of 64 image tokens: R = 50%


@pytest.fixture(scope="module")
def eager():
    """The tiny eager model, a left-padded batch and transformers' own attention weights for it."""
    model, inputs = tiny_llava("eager"), tiny_inputs(QUESTIONS)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions  # per layer [B, H, S, S]
    return model, inputs, attentions


def image_columns(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, V] input positions of the image tokens."""
    return torch.stack([row.nonzero()[:, 0] for row in input_ids == IMAGE_TOKEN_ID])


def top_image_tokens(received: torch.Tensor, columns: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] ascending input positions of the k image tokens with the highest ``received`` [B, S]."""
    return columns.gather(1, received.gather(1, columns).topk(k).indices.sort().values)


def kept_by(model, inputs, scorer, plan: PruningPlan) -> list[torch.Tensor]:
    with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
        model(**inputs)
    return engine.last.kept


class Spy:
    """Wraps a scorer and records the scores it returns."""

    def __init__(self, inner) -> None:
        self.inner, self.scores = inner, []

    def score(self, signals):
        self.scores.append(self.inner.score(signals))
        return self.scores[-1]


# ---- FastV ---------------------------------------------------------------------------------------


def test_fastv_keeps_what_fastvs_code_keeps(eager):
    """K=2: layer 1's weights, last token's row, head mean, top 50% of the image tokens, one stage."""
    model, inputs, attentions = eager
    k_layer = 2
    last_row = attentions[k_layer - 1].mean(1)[:, -1]  # [B, S]
    expected = top_image_tokens(last_row, image_columns(inputs["input_ids"]), KEEP)
    kept = kept_by(model, inputs, SCORERS.get("fastv")(), PruningPlan.of([k_layer - 1], [KEEP]))
    assert torch.equal(kept[0], expected)


def test_fastv_query_all_is_the_mean_from_all_other_tokens(eager):
    """query="all": mean over the other non-padding queries; each token's attention to itself left out."""
    model, inputs, attentions = eager
    valid = inputs["attention_mask"].bool()
    weights = attentions[1].mean(1) * valid[:, :, None]  # [B, S, S], padding query rows out
    itself = torch.eye(weights.shape[-1], dtype=torch.bool)
    others = weights.masked_fill(itself, 0.0).sum(1) / (valid.sum(1, keepdim=True) - 1)  # [B, S]
    with_self = weights.sum(1) / valid.sum(1, keepdim=True)
    columns = image_columns(inputs["input_ids"])
    spy = Spy(SCORERS.get("fastv")(query="all"))
    kept = kept_by(model, inputs, spy, PruningPlan.of([1], [KEEP]))
    torch.testing.assert_close(spy.scores[0], others.gather(1, columns), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(spy.scores[0], with_self.gather(1, columns), atol=1e-6, rtol=1e-5)
    assert torch.equal(kept[0], top_image_tokens(others, columns, KEEP))
    assert not torch.equal(kept[0], top_image_tokens(attentions[1].mean(1)[:, -1], columns, KEEP))  # != "last"


def test_all_t2v_drops_self_attention_by_hand():
    """Rows = queries over [t0, v0, v1, t1]. With its self-attention v1 would win; without, v0 does."""
    attention = torch.tensor([[[1.0, 0.0, 0.0, 0.0],
                               [0.9, 0.1, 0.0, 0.0],
                               [0.0, 0.0, 1.0, 0.0],
                               [0.2, 0.5, 0.3, 0.0]]])
    layout = TokenLayout(
        vision=torch.tensor([[1, 2]]), vision_orig=torch.tensor([[1, 2]]), vision_rank=torch.tensor([[0, 1]]),
        text=torch.tensor([[3]]), text_valid=torch.tensor([[True]]), valid=torch.ones(1, 4, dtype=torch.bool),
    )
    signals = Signals(layout=layout, interface=None, layer_idx=0, stage=0, q=torch.zeros(1, 4, 4))
    signals.memo[("attention", 0, "layer")] = {("all", None): attention}
    # v0 receives 0 + 0.5 from the 3 others, v1 receives 0.3 (its own 1.0 is not counted)
    torch.testing.assert_close(signals.all_t2v, torch.tensor([[0.5 / 3, 0.3 / 3]]))


# ---- PyramidDrop ---------------------------------------------------------------------------------


def test_pdrop_keeps_what_pyramiddrops_code_keeps(eager):
    """Pruning after layer 1 ranks by layer 2's attention on the unpruned sequence (last instruction token)."""
    model, inputs, attentions = eager
    expected = top_image_tokens(attentions[2].mean(1)[:, -1], image_columns(inputs["input_ids"]), KEEP)
    kept = kept_by(model, inputs, SCORERS.get("pdrop")(), PruningPlan.of([1, 3], [KEEP, 16]))
    assert torch.equal(kept[0], expected)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_pdrop_later_stage_ranks_by_the_next_layer_on_the_kept_tokens(eager, positions):
    """Stage 2 (after layer 3) ranks by what layer 4 computes on the stage-1 tokens, in the plan's positions."""
    model, inputs, _ = eager
    kept = kept_by(model, inputs, SCORERS.get("pdrop")(), PruningPlan.of([1, 3], [KEEP, 16], positions))
    # Transformers' own layer-4 weights after the same first cut (replayed), without the second one.
    with torch.no_grad(), PruningEngine(model, None, PruningPlan.of([1], [KEEP], positions), replay=[kept[0]]):
        attentions = model(**inputs, output_attentions=True).attentions
    keep = inputs["input_ids"] != IMAGE_TOKEN_ID
    keep.scatter_(1, kept[0], True)
    sequence = torch.stack([row.nonzero()[:, 0] for row in keep])  # [B, S'] input positions run after layer 1
    slots = (sequence[:, :, None] == kept[0][:, None, :]).float().argmax(1)  # [B, 32] their slots
    scores = attentions[4].mean(1)[:, -1].gather(1, slots)
    assert torch.equal(kept[1], kept[0].gather(1, scores.topk(16).indices.sort().values))


def test_pdrop_same_layer_option_is_the_pruned_layers_attention_and_differs(eager):
    model, inputs, attentions = eager
    columns = image_columns(inputs["input_ids"])
    same = kept_by(model, inputs, SCORERS.get("pdrop")(attention="same"), PruningPlan.of([1], [KEEP]))[0]
    nxt = kept_by(model, inputs, SCORERS.get("pdrop")(attention="next"), PruningPlan.of([1], [KEEP]))[0]
    assert torch.equal(same, top_image_tokens(attentions[1].mean(1)[:, -1], columns, KEEP))
    assert torch.equal(nxt, top_image_tokens(attentions[2].mean(1)[:, -1], columns, KEEP))
    assert not torch.equal(same, nxt)  # on this model the two readings keep different tokens


def test_pdrop_dtype_model_rounds_like_half_precision_eager_weights():
    """dtype="model": softmax cast to the model's dtype before the head mean, exactly as transformers'
    bf16 eager weights averaged in bf16 (ties at the cut included); "float32" keeps float32."""
    model, inputs = tiny_llava("eager").to(torch.bfloat16), tiny_inputs(QUESTIONS)
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    reference = attentions[2].mean(1)[:, -1].gather(1, image_columns(inputs["input_ids"])).float()
    spies = {dtype: Spy(SCORERS.get("pdrop")(dtype=dtype)) for dtype in ("model", "float32")}
    for spy in spies.values():
        kept_by(model, inputs, spy, PruningPlan.of([1], [KEEP]))
    model_dtype, fp32 = spies["model"].scores[0], spies["float32"].scores[0]
    assert torch.equal(model_dtype, reference)
    assert torch.equal(model_dtype, model_dtype.bfloat16().float()) and not torch.equal(fp32, fp32.bfloat16().float())
    torch.testing.assert_close(fp32, reference, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_next_layer_signals_equal_transformers_attention_under_sdpa_and_gqa(kv_heads):
    """``signals.next_layer`` (a general signal) is layer l+1's attention on the unpruned sequence, with any
    attention implementation: compared with the eager twin's weights (same seed, same weights)."""
    inputs = tiny_inputs(QUESTIONS)
    with torch.no_grad():
        attentions = tiny_llava("eager", num_kv_heads=kv_heads)(**inputs, output_attentions=True).attentions
    seen = {}

    class Capture:
        def score(self, signals):
            seen["t2v"], seen["layer"] = signals.next_layer.t2v, signals.next_layer.layer_idx
            return signals.last_t2v

    kept_by(tiny_llava("sdpa", num_kv_heads=kv_heads), inputs, Capture(), PruningPlan.of([2], [KEEP]))
    columns = image_columns(inputs["input_ids"])  # [B, V]
    text = torch.arange(inputs["input_ids"].shape[1] - max(QUESTIONS), inputs["input_ids"].shape[1])
    is_question = (text[None] > columns[:, -1:]) & inputs["attention_mask"][:, text].bool()  # [B, T]
    rows = attentions[3].mean(1)[:, text]  # [B, T, S]
    expected = rows.gather(2, columns[:, None].expand(-1, len(text), -1)) * is_question[:, :, None]
    assert seen["layer"] == 3
    torch.testing.assert_close(seen["t2v"], expected, atol=1e-5, rtol=1e-4)


def test_next_layer_after_the_last_layer_says_so():
    model, inputs = tiny_llava(), tiny_inputs([5])
    with pytest.raises(RuntimeError, match="no next-layer attention after layer 5"):
        kept_by(model, inputs, SCORERS.get("pdrop")(), PruningPlan.of([5], [KEEP]))


def test_baseline_options_are_validated():
    with pytest.raises(ValueError, match="fastv query 'first' unknown"):
        SCORERS.get("fastv")(query="first")
    with pytest.raises(ValueError, match="pdrop attention 'previous' unknown"):
        SCORERS.get("pdrop")(attention="previous")
    with pytest.raises(ValueError, match="dtype 'half' unknown"):
        SCORERS.get("pdrop")(dtype="half")


# ---- protocols in one experiment -----------------------------------------------------------------


def test_layers_prune_before_rescales_pyramiddrops_stage_boundaries():
    pdrop = SCHEDULES.get("layers")(layers=[8, 16, 24], scale_from=32, prune_before=True)
    assert pdrop.locations(32) == [7, 15, 23]  # before layers 8, 16, 24
    assert pdrop.locations(8) == [1, 3, 5]  # four equal stages of two layers
    assert pdrop.locations(16) == [3, 7, 11]
    assert SCHEDULES.get("layers")(layers=[2], prune_before=True).locations(8) == [1]  # FastV's K=2


def test_paper_baselines_runs_each_method_under_its_own_protocol():
    combos = plan(load_config(["experiment=paper_baselines"]), 8, 144)  # the shipped model: 8 layers
    protocol = {(c.scorer, c.budget): (c.locations, c.positions, len(c.keep)) for c in combos if not c.is_vanilla}
    for budget in (48.0, 32.0):
        assert protocol[("text_prior", budget)] == ([0, 3, 5], "original", 3)  # AdaptInfer [1, 10, 20] of 32
        assert protocol[("fastv", budget)] == ([1], "original", 1)  # K=2, once
        assert protocol[("pdrop", budget)] == ([1, 3, 5], "compact", 3)  # before 8, 16, 24 of 32
    pdrop = [c for c in combos if c.scorer == "pdrop"]
    assert all(c.keep[1] * 2 in range(c.keep[0] - 1, c.keep[0] + 2) for c in pdrop)  # lambda = 0.5
    main = plan(load_config(["experiment=main_table"]), 8, 144)
    assert {len(c.locations) for c in main if c.scorer == "fastv"} == {1}  # FastV prunes once


def write(tmp_path, text: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    return f"experiment={path}"


def test_a_scorer_entry_carries_its_own_schedules_and_positions(tmp_path):
    cfg = load_config([write(tmp_path, """\
        scorers:
          - text_prior
          - {name: fastv, query: all, schedules: [{name: single, layer: 2}], positions: compact}
        schedules: [{name: layers, layers: [0, 3]}]
        budgets: [40]
        """)])
    combos = {c.scorer: c for c in plan(cfg, 8, 144)}
    assert combos["text_prior"].locations == [0, 3] and combos["text_prior"].positions == "original"
    fastv = combos["fastv"]
    assert fastv.locations == [2] and fastv.positions == "compact" and fastv.scorer_params == {"query": "all"}
    assert fastv.plan().positions == "compact" and fastv.make_scorer().query == "all"
    assert fastv.name.endswith("__b40__compact")  # its own positions are part of its name (results on disk)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{name: fastv, positions: shuffled}", "scorer 'fastv': unknown positions 'shuffled'"),
        ("{name: fastv, schedules: [{name: singel}]}", "Did you mean 'single'?"),
        ("{name: fastv, schedules: [{name: single, layer: 1, ratio: 2}]}", "ratio 2 out of range"),
        ("{name: fastv, schedules: []}", "schedules must be a non-empty list"),
        ("{name: fastv, schedules: [{name: changepoint}]}", "calibrated changepoint schedule belongs"),
        ("{name: atp, schedules: [{name: single}]}", "prunes once before the LLM"),
        ("{name: fastv, query: first}", "fastv query 'first' unknown"),
    ],
)
def test_bad_scorer_protocol_fails_in_validation(tmp_path, entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config([write(tmp_path, f"scorers: [{entry}]\nbudgets: [40]\n")])


def test_a_result_from_other_scorer_defaults_is_not_reused(tmp_path):
    """A finished combination is reused only with the same scorer settings, defaults included: results
    written before pdrop's default became the next layer's attention are run again."""
    from research.resume import fingerprint, scorer_settings, stale_reason

    cfg = load_config([write(tmp_path, "scorers: [pdrop]\nschedules: [{name: layers, layers: [1, 3]}]\n"
                                       "budgets: [40]\n")])
    combo = plan(cfg, 8, 144)[1]
    assert scorer_settings(combo) == {"attention": "next", "dtype": "model"}
    key = fingerprint(shaped(cfg), combo, weights="w")
    assert stale_reason({"status": "ok", "fingerprint": key}, key) is None
    older_default = {**key, "scorer settings": "written with attention=same"}
    assert stale_reason({"status": "ok", "fingerprint": older_default}, key) == "scorer settings changed"


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_fastv_and_pdrop_share_one_dtype_option(name):
    """``dtype`` is declared and checked once (scorers.base.SoftmaxDtypeOption), for both baselines."""
    from scorers.base import SoftmaxDtypeOption

    scorer = SCORERS.get(name)
    assert issubclass(scorer, SoftmaxDtypeOption) and "dtype" not in vars(scorer).get("__annotations__", {})
    assert scorer().dtype == "model"
    with pytest.raises(ValueError, match=r"^dtype 'half' unknown; choose one of \['model', 'float32'\]$"):
        scorer(dtype="half")
