"""Correctness of the hook engine against references that need no hooks of ours to be right.

* full budget -> logits bitwise equal to vanilla;
* pruned forward == the unpruned model with the pruned keys masked out (per layer), at kept positions;
* cached greedy decode == no-cache recompute of the same pruned sequence;
* each row of a left-padded batch == that row alone.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS, row, tiny_inputs, tiny_llava

from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

QUESTIONS = [5, 11, 8]  # question lengths of the left-padded batch (rows 0 and 2 get padding)
PLAN = PruningPlan.of(locations=[1, 3], keep=[24, 10])
INTERFACE_PLAN = PruningPlan.of(locations=[-1], keep=[20])
BOTH_PLAN = PruningPlan.of(locations=[-1, 2], keep=[40, 16])  # before the LLM, then inside it
LOCATION_KINDS = {"layers-1-3": PLAN, "interface": INTERFACE_PLAN, "interface-and-layer-2": BOTH_PLAN}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {
        "sdpa": tiny_llava("sdpa"),
        "eager": tiny_llava("eager"),
        "gqa": tiny_llava("sdpa", num_kv_heads=2),
    }


def batch(size: int) -> dict[str, torch.Tensor]:
    return tiny_inputs(QUESTIONS[:size] if size > 1 else [7])


@torch.no_grad()
def logits(model, inputs, engine_args=None) -> tuple[torch.Tensor, PruningEngine | None]:
    if engine_args is None:
        return model(**inputs).logits, None
    with PruningEngine(model, **engine_args) as engine:
        out = model(**inputs).logits
    return out, engine


def kept_sequence(input_ids: torch.Tensor, kept_vision: torch.Tensor) -> torch.Tensor:
    """[B, S'] input indices of every kept token: all non-vision tokens plus the kept vision ones."""
    keep = input_ids != IMAGE_TOKEN_ID
    keep.scatter_(1, kept_vision, True)
    return torch.stack([r.nonzero()[:, 0] for r in keep])


@contextlib.contextmanager
def masked_reference(model, inputs, record):
    """The unpruned model, but every layer after a stage cannot attend to the keys that stage pruned (on the
    inputs' device, the mask in the model's dtype)."""
    input_ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    b, s = input_ids.shape
    device, dtype = input_ids.device, next(model.parameters()).dtype
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    base = causal[None] & valid[:, None, :]
    base |= torch.eye(s, dtype=torch.bool, device=device)[None]  # padding queries attend to themselves: no NaN rows
    is_vision = input_ids == IMAGE_TOKEN_ID
    handles = []
    for idx, layer in enumerate(model.model.language_model.layers):
        allowed = base.clone()
        for location, kept in zip(record.locations, record.kept):
            if location < idx:
                pruned = is_vision.clone().scatter_(1, kept, False)
                allowed &= ~pruned[:, None, :]
        float_mask = torch.zeros(b, 1, s, s, dtype=dtype, device=device).masked_fill(~allowed[:, None],
                                                                                     torch.finfo(dtype).min)
        def swap(module, args, kwargs, mask=float_mask):
            return args, {**kwargs, "attention_mask": mask}
        handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("name", ["sdpa", "eager", "gqa"])
def test_full_budget_is_bitwise_vanilla(models, name, size):
    model, inputs = models[name], batch(size)
    vanilla, _ = logits(model, inputs)
    full = PruningPlan.of(locations=[1, 3], keep=[NUM_IMAGE_TOKENS, NUM_IMAGE_TOKENS])
    pruned, _ = logits(model, inputs, {"scorer": SCORERS.get("text_prior")(), "plan": full})
    assert torch.equal(pruned, vanilla)
    # Replaying "keep every vision token" runs the whole gather/slice path and must still be exact.
    first_image = (inputs["input_ids"] == IMAGE_TOKEN_ID).int().argmax(1, keepdim=True)  # [B, 1]
    every = [torch.arange(NUM_IMAGE_TOKENS).expand(size, -1) + first_image] * 2
    replayed, _ = logits(model, inputs, {"scorer": None, "plan": full, "replay": every})
    assert torch.equal(replayed, vanilla)


def pruned_and_masked_reference(model, inputs: dict, plan) -> tuple[torch.Tensor, torch.Tensor, object, torch.Tensor]:
    """The pruned forward's logits ``[B, S_kept, V]``, the masked reference's at the same slots, the engine's record
    and the kept slots that are not padding ``[B, S_kept]`` (``random`` for a plan before the LLM, ``text_prior``
    otherwise); the plan's token counts checked on the way."""
    scorer = SCORERS.get("random" if plan is INTERFACE_PLAN else "text_prior")()
    pruned, engine = logits(model, inputs, {"scorer": scorer, "plan": plan})
    record = engine.last
    assert record.tokens_per_layer == plan.tokens_per_layer(6, NUM_IMAGE_TOKENS)
    kept = kept_sequence(inputs["input_ids"], record.kept[-1])
    with masked_reference(model, inputs, record):
        reference, _ = logits(model, inputs)
    reference = reference.gather(1, kept[:, :, None].expand(-1, -1, reference.shape[-1]))
    valid = inputs["attention_mask"].gather(1, kept).bool()
    assert pruned.shape == reference.shape
    return pruned, reference, record, valid


@pytest.mark.parametrize("plan", [PLAN, INTERFACE_PLAN], ids=["layers-1-3", "interface"])
@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("name", ["sdpa", "eager", "gqa"])
def test_pruned_forward_equals_masked_reference(models, name, size, plan):
    model, inputs = models[name], batch(size)
    pruned, reference, record, valid = pruned_and_masked_reference(model, inputs, plan)
    torch.testing.assert_close(pruned[valid], reference[valid], atol=1e-4, rtol=0)

    # Negative control: renumbered (compact) positions are a different model and must not match.
    compact = PruningPlan.of(plan.locations, plan.keep, positions="compact")
    renumbered, _ = logits(model, inputs, {"scorer": None, "plan": compact, "replay": record.kept})
    assert (renumbered[valid] - reference[valid]).abs().max() > 1e-3


def greedy_with_cache(model, inputs, engine_args, steps=5, **generate_kwargs):
    with torch.no_grad(), PruningEngine(model, **engine_args) as engine:
        out = model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **generate_kwargs,
        )
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new_tokens, torch.stack(out.logits, 1), engine.last


def recompute_without_cache(model, inputs, tokens, plan, record):
    """Re-run the whole sequence for each step, no cache, replaying the prefill's kept tokens."""
    step_logits = []
    for t in range(tokens.shape[1]):
        grown = {
            "input_ids": torch.cat([inputs["input_ids"], tokens[:, :t]], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :t])], 1),
            "pixel_values": inputs["pixel_values"],
        }
        with torch.no_grad(), PruningEngine(model, None, plan, replay=record.kept):
            step_logits.append(model(**grown, use_cache=False).logits[:, -1])
    return torch.stack(step_logits, 1)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("kind", list(LOCATION_KINDS))
@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_cached_decode_equals_no_cache_recompute(models, name, kind, positions, cache):
    model, inputs = models[name], batch(3)
    plan = PruningPlan.of(LOCATION_KINDS[kind].locations, LOCATION_KINDS[kind].keep, positions=positions)
    scorer = SCORERS.get("text_prior" if kind == "layers-1-3" else "random")()
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    tokens, cached_logits, record = greedy_with_cache(model, inputs, {"scorer": scorer, "plan": plan}, **extra)
    recomputed = recompute_without_cache(model, inputs, tokens, plan, record)
    torch.testing.assert_close(cached_logits, recomputed, atol=1e-4, rtol=0)
    assert torch.equal(recomputed.argmax(-1), tokens)


class EmbeddingNorm:
    """A content-based interface scorer (random draws depend on the batch, so they cannot be used here)."""

    def score(self, signals):
        return signals.interface.vision_embeds.norm(dim=-1)  # [B, V]


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("plan", [PLAN, INTERFACE_PLAN], ids=["layers-1-3", "interface"])
def test_padded_rows_equal_rows_alone(models, plan, positions):
    model, inputs = models["sdpa"], batch(3)
    plan = PruningPlan.of(plan.locations, plan.keep, positions=positions)
    scorer = SCORERS.get("text_prior")() if plan.locations[0] >= 0 else EmbeddingNorm()
    tokens, _, record = greedy_with_cache(model, inputs, {"scorer": scorer, "plan": plan})
    padding = (inputs["attention_mask"] == 0).sum(1)
    for i in range(3):
        alone_tokens, _, alone = greedy_with_cache(model, row(inputs, i), {"scorer": scorer, "plan": plan})
        for stage_kept, alone_kept in zip(record.kept, alone.kept):
            assert torch.equal(stage_kept[i] - padding[i], alone_kept[0])
        assert torch.equal(tokens[i], alone_tokens[0])


def test_hooks_are_removed_and_model_unchanged(models):
    model, inputs = models["sdpa"], batch(3)
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    vanilla, _ = logits(model, inputs)
    logits(model, inputs, {"scorer": SCORERS.get("text_prior")(), "plan": PLAN})
    assert hooks() == before
    assert torch.equal(logits(model, inputs)[0], vanilla)


def test_compact_positions_renumber_kept_tokens(models):
    """Compact positions equal running the physically shorter sequence from scratch at the interface."""
    model, inputs = models["sdpa"], batch(1)
    plan = PruningPlan.of([-1], [16], positions="compact")
    pruned, engine = logits(model, inputs, {"scorer": SCORERS.get("random")(), "plan": plan})
    kept = kept_sequence(inputs["input_ids"], engine.last.kept[0])
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"].clamp(max=63))
        image = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        embeds[inputs["input_ids"] == IMAGE_TOKEN_ID] = torch.cat(list(image)).reshape(-1, embeds.shape[-1])
        shorter = embeds.gather(1, kept[:, :, None].expand(-1, -1, embeds.shape[-1]))
        direct = model(inputs_embeds=shorter).logits
    torch.testing.assert_close(pruned, direct, atol=1e-5, rtol=0)


def test_errors_are_one_line():
    model = tiny_llava()
    with pytest.raises(ValueError, match=r"location\(s\) \[6\] out of range for a 6-layer LLM"):
        PruningEngine(model, SCORERS.get("text_prior")(), PruningPlan.of([6], [8]))
    with pytest.raises(ValueError, match="exceeds the 64 vision tokens"), torch.no_grad():
        with PruningEngine(model, SCORERS.get("text_prior")(), PruningPlan.of([1], [80])):
            model(**batch(1))
    with pytest.raises(ValueError, match="choose one of"):
        PruningPlan.of([1], [8], positions="shifted")
    with pytest.raises(RuntimeError, match="only inside the LLM"), torch.no_grad():
        with PruningEngine(model, SCORERS.get("text_prior")(), PruningPlan.of([-1], [8])):
            model(**batch(1))


def cache_keywords() -> list[str]:
    """The keyword(s) the installed transformers accepts for the KV cache at a model's call."""
    import inspect

    accepted = inspect.signature(type(tiny_llava().model).forward).parameters
    names = [name for name in ("past_key_values", "cache") if name in accepted]
    return names + ["past_key_values"] * (not names)  # 5.24+: "cache", with "past_key_values" still translated


@pytest.mark.parametrize("keyword", sorted({*cache_keywords(), "past_key_values"}))
def test_decode_steps_are_found_by_the_cache_type_not_its_keyword(models, keyword):
    """A hand-written decode loop passing the cache under either name equals the no-cache recompute.

    transformers 5.24 renamed the cache keyword inside models; an engine that looked for it by its
    old name took every decode step for a text-only forward and decoded unpruned.
    """
    from transformers import DynamicCache

    model, inputs = models["sdpa"], batch(3)
    plan = PruningPlan.of([-1, 2], [40, 16], positions="compact")
    cache = DynamicCache(config=model.config.text_config)
    tokens, step_logits = [], []
    with torch.no_grad(), PruningEngine(model, SCORERS.get("random")(), plan) as engine:
        out = model(**inputs, use_cache=True, **{keyword: cache})
        mask = inputs["attention_mask"]
        for _ in range(4):
            step_logits.append(out.logits[:, -1])
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
            out = model(input_ids=tokens[-1], attention_mask=mask, use_cache=True, **{keyword: cache})
    assert len(engine.records) == 1  # decode steps continued the prefill, none started a new one
    recomputed = recompute_without_cache(model, inputs, torch.cat(tokens, 1), plan, engine.records[0])
    torch.testing.assert_close(torch.stack(step_logits, 1), recomputed, atol=1e-4, rtol=0)


def test_a_decode_step_that_feeds_the_image_token_id_is_a_decode_step(models):
    model, inputs = models["sdpa"], batch(3)
    forced = torch.full((3, 1), IMAGE_TOKEN_ID)
    with torch.no_grad(), PruningEngine(model, SCORERS.get("text_prior")(), PLAN) as engine:
        out = model(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(forced)], 1)
        step = model(input_ids=forced, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    assert len(engine.records) == 1  # the step continued the prefill instead of starting a new one
    assert step.logits.shape == (3, 1, 64) and torch.isfinite(step.logits).all()


def test_a_failure_inside_transformers_names_scorer_layer_and_version(models):
    """A pruned forward that transformers rejects fails with one line: scorer, layer, version, tested range."""
    import transformers

    from research.pruning.compat import TransformersChanged

    model, inputs = models["sdpa"], batch(3)

    def corrupt_mask(module, args, kwargs):  # stands in for a release that changes the mask layout
        return args, {**kwargs, "attention_mask": kwargs["attention_mask"][..., :-3]}

    handle = model.model.language_model.layers[4].self_attn.register_forward_pre_hook(corrupt_mask, with_kwargs=True)
    try:
        with pytest.raises(TransformersChanged) as caught, torch.no_grad():
            with PruningEngine(model, SCORERS.get("text_prior")(), PLAN):
                model(**inputs)
    finally:
        handle.remove()
    message = str(caught.value)
    assert "\n" not in message
    assert "scorer text_prior" in message and "decoder layer 4" in message
    assert f"transformers {transformers.__version__}" in message and "tested range" in message


def test_errors_of_our_own_code_are_not_blamed_on_transformers(models):
    class Broken:
        def score(self, signals):
            raise ZeroDivisionError("scorer bug")

    with pytest.raises(ZeroDivisionError, match="scorer bug"), torch.no_grad():
        with PruningEngine(models["sdpa"], Broken(), PLAN):
            models["sdpa"](**batch(1))


@pytest.mark.parametrize(
    "returned, message",
    [
        (lambda v: torch.full_like(v, float("nan"), dtype=torch.float32), "non-finite score"),
        (lambda v: torch.rand(1, v.shape[1]), "shape \\[1, 64\\], expected \\[3, 64\\]"),
        (lambda v: torch.rand(v.shape[0], v.shape[1] - 1), "shape \\[3, 63\\]"),
        (lambda v: v.clone(), "torch.int64 scores"),
        (lambda v: v.tolist(), "list, expected a float tensor"),
    ],
    ids=["nan", "batch-1", "width", "integer", "list"],
)
def test_bad_scorer_output_fails_with_one_line_naming_the_scorer(models, returned, message):
    from dataclasses import dataclass

    from scorers import Scorer

    @dataclass
    class Bad(Scorer):
        registry_name = "bad_scorer"

        def score(self, signals):
            return returned(signals.layout.vision)

    with pytest.raises(ValueError, match=f"scorer bad_scorer returned .*{message}") as caught, torch.no_grad():
        with PruningEngine(models["sdpa"], Bad(), PLAN):
            models["sdpa"](**batch(3))
    assert "\n" not in str(caught.value)


def test_a_no_op_stage_is_recorded_and_its_record_replays(models):
    """A stage that keeps every token is recorded, so ``engine.last.kept`` replays as a plan of the same stages."""
    model, inputs = models["sdpa"], batch(3)
    plan = PruningPlan.of([1, 3], [NUM_IMAGE_TOKENS, 10])  # stage 0 keeps all 64
    pruned, engine = logits(model, inputs, {"scorer": SCORERS.get("text_prior")(), "plan": plan})
    record = engine.last
    assert record.locations == [1, 3] and [k.shape[1] for k in record.kept] == [NUM_IMAGE_TOKENS, 10]
    replayed, _ = logits(model, inputs, {"scorer": None, "plan": plan, "replay": record.kept})
    assert torch.equal(replayed, pruned)
