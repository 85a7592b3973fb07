"""The engine's four correctness properties on every registered model family (tiny random weights).

Parametrized over ``FAMILIES``, so a new family is covered by registering it. Families whose image
size sets the number of image tokens (LLaVA-NeXT, OneVision, Qwen2-VL, Qwen2.5-VL) get rows of
different image-token counts in one left-padded batch:

* full budget -> logits bitwise equal to vanilla;
* pruned forward == the unpruned model with the pruned keys masked out, at the kept positions;
* greedy generate with a KV cache == the no-cache recompute of the same kept set;
* each row of a left-padded batch keeps the same tokens and answers the same as that row alone.
"""

from __future__ import annotations

import contextlib
from functools import cache

import pytest
import torch
from transformers import AutoConfig

from research.models import FAMILIES, UnsupportedModel, adapter_for, family_of_config
from research.models.base import vision_merging_refusal
from research.models.testing import (
    configurations,
    crop_marker_ids,
    family_of_configuration,
    random_config,
    random_inputs,
    random_model,
)
from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

FAMILY_NAMES = configurations()  # every family and named variant (InternVL3.5)
QUESTIONS = [5, 9, 7]
# image sizes per row (pixels) for the families whose image sets its token count: different counts per row
IMAGE_SIZES = {
    "llava_next": [(16, 32), (30, 30), (16, 16)],
    "llava_onevision": [(16, 32), (30, 30), (16, 16)],
    "qwen2_vl": [(16, 16), (16, 24), (24, 32)],
    "qwen2_5_vl": [(16, 16), (16, 24), (24, 32)],
    "idefics3": [(8, 8), (8, 16), (16, 16)],  # 8-px crops: the global view alone, 1x2 and 2x2 crops + global
    "smolvlm": [(16, 16), (16, 32), (32, 32)],  # 16-px crops, likewise
    "mistral3": [(16, 16), (16, 24), (24, 32)],
    "qwen3_vl": [(16, 16), (16, 24), (24, 32)],
    "qwen3_vl_moe": [(16, 16), (16, 24), (24, 32)],
}
LAYER_PLAN = PruningPlan.of([1, 2], [0.5, 0.25], relative=True)
ABSOLUTE_PLAN = PruningPlan.of([1, 2], [12, 5])  # rows with fewer tokens keep min(k, their own)
INTERFACE_PLAN = PruningPlan.of([-1, 2], [0.6, 0.3], relative=True)
PLANS = {"layers": LAYER_PLAN, "absolute": ABSOLUTE_PLAN, "interface": INTERFACE_PLAN}


class EmbeddingNorm:
    """A content-based interface scorer that ignores other rows (random draws depend on the batch)."""

    def score(self, signals):
        return signals.vision_embeds.norm(dim=-1)  # [B, V] the remaining vision tokens


def scorer_for(plan: PruningPlan):
    return EmbeddingNorm() if plan.locations[0] < 0 else SCORERS.get("text_prior")()


@cache
def model(family: str, attention: str = "sdpa"):
    return random_model(family, num_layers=4, num_kv_heads=2, attn_implementation=attention)


BATCHES = ["padded", "unpadded", "no_mask"]


@cache
def inputs(family: str, size: int = 3, kind: str = "padded") -> dict[str, torch.Tensor]:
    """A batch of ``size`` rows (the variable families' rows hold different numbers of image tokens):

    * ``padded``: questions of different lengths, left-padded;
    * ``unpadded``: questions as long as make every row the same length, so the processor's mask is all ones
      (transformers' sdpa path then hands the layers no mask at all);
    * ``no_mask``: the ``unpadded`` rows without an ``attention_mask`` (``model(**inputs)`` as users call it).
    """
    sizes = IMAGE_SIZES.get(family)
    sizes = sizes and sizes[:size]
    batch = random_inputs(model(family), QUESTIONS[:size], image_sizes=sizes)
    if kind == "padded":
        return batch
    # every row the same length: the image span (its image tokens and any markers around them) + question
    spans = [int(n) - q for n, q in zip(batch["attention_mask"].sum(1), QUESTIONS)]
    lengths = [QUESTIONS[0] + max(spans) - n for n in spans]
    batch = random_inputs(model(family), lengths, image_sizes=sizes)
    assert bool(batch["attention_mask"].all())
    if kind == "no_mask":
        batch = {key: value for key, value in batch.items() if key != "attention_mask"}
    return batch


def attention_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's mask, or all ones for a batch passed without one."""
    return batch.get("attention_mask", torch.ones_like(batch["input_ids"]))


def row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Row ``i`` alone, without its padding; Qwen-style flat ``pixel_values`` are cut by ``image_grid_thw``."""
    keep = attention_mask(batch)[i].bool()
    out = {}
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
            out[key] = value[i][keep][None]
        elif key == "pixel_values" and "image_grid_thw" in batch:
            ends = batch["image_grid_thw"].prod(1).cumsum(0).tolist()
            out[key] = value[([0] + ends)[i] : ends[i]]
        else:
            out[key] = value[i : i + 1]
    return out


def grown(batch: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``batch`` with ``tokens`` [B, t] appended (text tokens)."""
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], tokens], 1)
    if "attention_mask" in batch:
        out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in batch:
            out[key] = torch.cat([batch[key], torch.zeros_like(tokens)], 1)
    return out


@torch.no_grad()
def forward(family: str, batch: dict, attention: str = "sdpa", **engine_args):
    m = model(family, attention)
    if not engine_args:
        return m(**batch).logits, None
    with PruningEngine(m, **engine_args) as engine:
        logits = m(**batch).logits
    return logits, engine.last


@contextlib.contextmanager
def masked_reference(family: str, batch: dict, record, attention: str = "sdpa"):
    """The unpruned model, but every layer after a stage cannot attend to the keys that stage pruned. Where a layer
    receives a 4-D mask of its own (Gemma 3's image tokens attend to each other both ways), that mask is ANDed with
    the exclusion; elsewhere a causal mask over the real tokens is. Padding queries attend to themselves (no NaN
    rows)."""
    adapter = adapter_for(model(family, attention))
    input_ids, valid = batch["input_ids"], attention_mask(batch).bool()
    b, s = input_ids.shape
    base = torch.ones(s, s, dtype=torch.bool).tril()[None] & valid[:, None, :]
    is_vision = input_ids == adapter.image_token_id
    handles = []
    for idx, layer in enumerate(adapter.decoder_layers):
        excluded = torch.zeros(b, s, dtype=torch.bool)  # keys pruned before this layer
        for location, kept in zip(record.locations, record.kept):
            if location < idx:
                pruned = is_vision.clone()
                for r in range(b):
                    pruned[r, kept[r][kept[r] >= 0]] = False
                excluded |= pruned
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs, excluded=excluded: (args, {**kwargs, "attention_mask": reference_mask(
                base, excluded, kwargs.get("attention_mask"))}), with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def reference_mask(base: torch.Tensor, excluded: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    """[B, 1, S, S] additive mask: the layer's own 4-D mask (else ``base`` [B, S, S]) and the diagonal, without the
    ``excluded`` [B, S] keys."""
    if own is not None and own.dim() == 4:
        base = (own if own.dtype == torch.bool else own == 0)[:, 0].expand_as(base)
    allowed = (base | torch.eye(base.shape[-1], dtype=torch.bool)[None]) & ~excluded[:, None, :]
    return torch.zeros(allowed.shape[0], 1, *allowed.shape[1:]).masked_fill(~allowed[:, None],
                                                                            torch.finfo(torch.float32).min)


def kept_slots(batch: dict, record, image_token_id: int, r: int) -> torch.Tensor:
    """Input slots of row ``r`` that the last stage kept: every non-image slot and the kept image ones."""
    keep = batch["input_ids"][r] != image_token_id
    kept = record.kept[-1][r]
    keep[kept[kept >= 0]] = True
    return keep.nonzero()[:, 0]


def test_rows_of_the_variable_families_hold_different_numbers_of_image_tokens():
    for family in IMAGE_SIZES:
        image = model(family).config.image_token_id
        counts = (inputs(family)["input_ids"] == image).sum(1).tolist()
        assert len(set(counts)) == 3, (family, counts)


CROP_FAMILIES = ["idefics3", "smolvlm"]


@pytest.mark.parametrize("family", CROP_FAMILIES)
def test_crop_rows_hold_different_numbers_of_crops_and_each_crop_its_own_tokens(family):
    """Rows of 1, 3 and 5 crops (the global view alone, 1x2 and 2x2 crops and the global view) in one
    ``pixel_values`` [B, 5, 3, H, W], padded with all-zero crops; the model gives each row as many image features
    as its input_ids hold image tokens, ``crop_tokens`` per crop."""
    m, batch = model(family), inputs(family)
    crops = (batch["pixel_values"].flatten(2).abs().sum(-1) > 0).sum(1)
    assert crops.tolist() == [1, 3, 5]
    assert torch.equal(batch["pixel_attention_mask"].flatten(2).any(-1).sum(1), crops)
    with torch.no_grad():
        features = m.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
    counts = (batch["input_ids"] == m.config.image_token_id).sum(1)
    per_crop = FAMILIES.get(family).crop_tokens(m.config)
    assert [len(f) for f in features] == counts.tolist() == (crops * per_crop).tolist()


def idefics3_processor(side: int, crop_tokens: int):
    """transformers' ``Idefics3Processor`` (PIL image processor, no resize: an image splits into ``side``-pixel
    crops as given) over a word tokenizer whose marker ids are those of the random models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor, PreTrainedTokenizerFast

    from research.models.testing import FAKE_TOKEN_AROUND_IMAGE, GLOBAL_IMAGE_TOKEN, NEWLINE_TOKEN, row_col_token

    markers = {"<image>": 3, "<fake_token_around_image>": FAKE_TOKEN_AROUND_IMAGE, "<global-img>": GLOBAL_IMAGE_TOKEN,
               "\n": NEWLINE_TOKEN, **{f"<row_{i + 1}_col_{j + 1}>": row_col_token(i, j) for i in range(6)
                                       for j in range(6)}}
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **markers, "<end_of_utterance>": 60, "what": 61}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": list(markers)})
    images = Idefics3ImageProcessorPil(max_image_size={"longest_edge": side}, do_resize=False)
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=crop_tokens)


def test_random_crop_inputs_are_laid_out_as_the_idefics3_processor_lays_them_out():
    """The random Idefics3 rows hold the image span transformers' processor writes for images of those sizes
    (markers, crops in row-major order, the global view last), and ``pixel_values`` / ``pixel_attention_mask``
    are shaped and padded as its batch is."""
    from PIL import Image

    m, batch = model("idefics3"), inputs("idefics3")
    side = m.config.vision_config.image_size
    processor = idefics3_processor(side, FAMILIES.get("idefics3").crop_tokens(m.config))
    images = [[Image.new("RGB", (w, h), (200, 30, 90))] for h, w in IMAGE_SIZES["idefics3"]]
    real = processor(images=images, text=["<image> what"] * 3, return_tensors="pt", padding=True)
    for key in ("pixel_values", "pixel_attention_mask"):
        assert real[key].shape == batch[key].shape, key
    assert torch.equal(real["pixel_attention_mask"], batch["pixel_attention_mask"])
    span = torch.isin(batch["input_ids"], torch.tensor([m.config.image_token_id, *crop_marker_ids()]))
    for r in range(3):
        theirs = real["input_ids"][r][real["attention_mask"][r].bool()][:-1]  # without the question word
        where = span[r].nonzero()[:, 0]
        assert torch.equal(batch["input_ids"][r, where.min() : where.max() + 1], theirs), r


@pytest.mark.parametrize("kind", ["layers", "interface"])
@pytest.mark.parametrize("family", CROP_FAMILIES)
def test_crop_markers_are_never_pruned_and_reach_the_llm_unchanged(family, kind):
    """Only the ``<image>`` tokens (the config's image_token_id) are ranked, kept or dropped, and counted by the
    budget; ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>`` and the newlines between crop rows
    are never in a kept set and enter the LLM (interface pruning) with their own embeddings."""
    m, batch, plan = model(family), inputs(family), PLANS[kind]
    ids, image = batch["input_ids"], m.config.image_token_id
    markers = torch.isin(ids, torch.tensor(crop_marker_ids()))
    assert markers.sum(1).tolist() == [3, 9, 14]  # fake x2 + global (+ per crop: fake, row/col; + newlines)
    embeds, llm_inputs = [], []
    adapter = adapter_for(m)
    grab = adapter.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            m(**batch)
    finally:
        grab.remove()
    with torch.no_grad(), PruningEngine(m, scorer_for(plan), plan) as engine:
        first = adapter.decoder_layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: llm_inputs.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True)
        try:
            m(**batch)
        finally:
            first.remove()
    record, counts = engine.last, (ids == image).sum(1)
    for stage, fraction in zip(record.kept, plan.keep):
        assert torch.equal((stage >= 0).sum(1), torch.round(fraction * counts.double()).long())
        for r in range(len(ids)):
            kept = stage[r][stage[r] >= 0]
            assert (ids[r, kept] == image).all() and not markers[r, kept].any()
    if kind == "interface":
        for r in range(len(ids)):  # the LLM's input: every non-image slot and the image slots kept at -1
            keep = ids[r] != image
            keep[record.kept[0][r][record.kept[0][r] >= 0]] = True
            slots = keep.nonzero()[:, 0]
            assert markers[r, slots].sum() == markers[r].sum()
            real = batch["attention_mask"][r, slots].bool()
            mine = llm_inputs[0][r, -len(slots):]  # fillers pad shorter rows on the left
            torch.testing.assert_close(mine[real], embeds[0][r, slots][real], atol=0, rtol=0)


@pytest.mark.parametrize("batching", BATCHES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_full_budget_is_bitwise_vanilla(family, batching):
    batch = inputs(family, kind=batching)
    vanilla, _ = forward(family, batch)
    full = PruningPlan.of([-1, 1, 2], [1.0, 1.0, 1.0], relative=True)
    pruned, _ = forward(family, batch, scorer=SCORERS.get("text_prior")(), plan=full)
    assert torch.equal(pruned, vanilla)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("batching", BATCHES)
@pytest.mark.parametrize("kind", list(PLANS))
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pruned_forward_equals_masked_reference(family, kind, batching, attention):
    batch, plan = inputs(family, kind=batching), PLANS[kind]
    pruned, record = forward(family, batch, attention, scorer=scorer_for(plan), plan=plan)
    counts = (batch["input_ids"] == model(family).config.image_token_id).sum(1)
    expected = [plan.tokens_per_layer(4, int(n)) for n in counts]
    assert record.tokens_per_layer == pytest.approx([sum(c) / len(c) for c in zip(*expected)])
    with masked_reference(family, batch, record, attention):
        reference, _ = forward(family, batch, attention)
    image = model(family).config.image_token_id
    for r in range(len(counts)):
        slots = kept_slots(batch, record, image, r)
        real = attention_mask(batch)[r, slots].bool()
        mine = pruned[r, pruned.shape[1] - len(slots):]  # fillers pad shorter rows on the left
        torch.testing.assert_close(mine[real], reference[r, slots][real], atol=1e-4, rtol=0)


def media_token_ids(family: str) -> list[int]:
    """Image / video placeholder ids: a random model may rank them first, but a decoded one would be read as an
    image without features when the answer so far is fed back (``grown``), so greedy decoding skips them."""
    config = model(family).config
    return [i for i in (config.image_token_id, getattr(config, "video_token_id", None)) if i is not None]


def greedy(family: str, batch: dict, plan: PruningPlan, steps: int = 4, **generate_kwargs):
    m = model(family)
    with torch.no_grad(), PruningEngine(m, scorer_for(plan), plan) as engine:
        out = m.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=media_token_ids(family), **generate_kwargs)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1), engine.last


def greedy_choice(family: str, logits: torch.Tensor) -> torch.Tensor:
    """The token greedy decoding picks from raw ``logits`` [..., V] (the media ids skipped)."""
    return logits.index_fill(-1, torch.tensor(media_token_ids(family)), float("-inf")).argmax(-1)


@pytest.mark.parametrize("batching", BATCHES)
@pytest.mark.parametrize("kind", ["layers", "interface"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cached_decode_equals_no_cache_recompute(family, kind, batching):
    batch, plan = inputs(family, kind=batching), PLANS[kind]
    tokens, cached, record = greedy(family, batch, plan)
    recomputed = []
    for t in range(tokens.shape[1]):
        with torch.no_grad(), PruningEngine(model(family), None, plan, replay=record.kept):
            recomputed.append(model(family)(**grown(batch, tokens[:, :t]), use_cache=False).logits[:, -1])
    recomputed = torch.stack(recomputed, 1)
    torch.testing.assert_close(cached, recomputed, atol=1e-4, rtol=0)
    assert torch.equal(greedy_choice(family, recomputed), tokens)


@pytest.mark.parametrize("batching", BATCHES)
@pytest.mark.parametrize("kind", ["layers", "absolute", "interface"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_batch_rows_equal_rows_alone(family, kind, batching):
    batch, plan = inputs(family, kind=batching), PLANS[kind]
    tokens, _, record = greedy(family, batch, plan)
    padding = (attention_mask(batch) == 0).sum(1)
    for i in range(3):
        alone_tokens, _, alone = greedy(family, row(batch, i), plan)
        for stage_kept, alone_kept in zip(record.kept, alone.kept):
            mine = stage_kept[i][stage_kept[i] >= 0]
            assert torch.equal(mine - padding[i], alone_kept[0])
        assert torch.equal(tokens[i], alone_tokens[0])


@pytest.mark.parametrize("family", [f for f in FAMILIES.names() if FAMILIES.get(f).position_axes > 1])
def test_decode_positions_after_pruning_equal_the_unpruned_models(family):
    """Pruned tokens keep their original 3-D positions, so a decode step sees the positions (the prefill's
    ``rope_deltas`` included) it sees without pruning; counting them from the shorter cache would not."""
    m = model(family)
    seen: dict[str, list[torch.Tensor]] = {"pruned": [], "vanilla": []}

    def spy(key):
        def hook(module, args, kwargs):
            seen[key].append(kwargs["position_embeddings"][0][:, -1:].clone())  # cos of the newest token
        return hook

    batch = inputs(family)
    for key, plan in (("vanilla", None), ("pruned", INTERFACE_PLAN)):
        handle = adapter_for(m).decoder_layers[-1].register_forward_pre_hook(spy(key), with_kwargs=True)
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if plan is not None:
                    stack.enter_context(PruningEngine(m, EmbeddingNorm(), plan))
                m.generate(**batch, max_new_tokens=3, do_sample=False)
        finally:
            handle.remove()
    assert len(seen["pruned"]) == len(seen["vanilla"]) == 3
    for pruned, vanilla in zip(seen["pruned"][1:], seen["vanilla"][1:]):  # the decode steps
        torch.testing.assert_close(pruned, vanilla, atol=0, rtol=0)


@pytest.mark.parametrize("family", [f for f in FAMILIES.names() if FAMILIES.get(f).position_axes > 1])
def test_compact_positions_are_refused_on_multi_axis_positions(family):
    with pytest.raises(ValueError, match="positions=compact renumbers 1-D positions"):
        PruningEngine(model(family), EmbeddingNorm(), PruningPlan.of([-1], [0.5], "compact", relative=True))


REFUSED = {  # model_type -> (tiny text config, tiny vision config, words of its reason)
    "qwen3_5": ({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "linear_num_value_heads": 2,
                 "linear_num_key_heads": 1, "linear_key_head_dim": 8, "linear_value_head_dim": 8},
                {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                 "patch_size": 2},
                "linear-attention \\(Gated DeltaNet\\) recurrences in three of every four layers"),
}


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_an_unsupported_class_is_refused_in_one_line_that_says_why(model_type):
    """Qwen3.5 (linear-attention recurrences) is refused with its reason, before its weights load (from
    config.json) and when a loaded one is handed to the engine."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    text, vision, reason = REFUSED[model_type]
    tiny = AutoConfig.for_model(model_type, text_config=text, vision_config=vision)
    loaded = AutoModelForImageTextToText.from_config(tiny)
    name = type(loaded).__name__
    saved = {**tiny.to_dict(), "architectures": [name]}  # what save_pretrained writes to config.json
    with pytest.raises(UnsupportedModel, match=f"model class {name} cannot be pruned: .*{reason}.*; supported "
                                               "families: .*qwen2_vl") as caught:
        family_of_config(saved)
    assert "\n" not in str(caught.value)
    with pytest.raises(UnsupportedModel, match=f"model_type '{model_type}' names no architecture this project can"):
        family_of_config(tiny.to_dict())
    with pytest.raises(UnsupportedModel, match=f"{name} cannot be pruned: .*{reason}"):
        PruningEngine(loaded, EmbeddingNorm(), PruningPlan.of([1], [4]))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_is_detected_from_its_config_json(family):
    config = model(family).config.to_dict()
    adapter = FAMILIES.get(family_of_configuration(family))
    assert family_of_config(config) is adapter
    assert family_of_config({k: v for k, v in config.items() if k != "architectures"}) is adapter


@cache
def clip_dir_for(family: str):
    """A tiny CLIP checkpoint whose vision tower matches the family's (for ``atp``'s text tower), on disk."""
    import tempfile

    from transformers import AutoConfig, AutoModel

    from research.shapes_model.vocab import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=tokenizer.eos_token_id)
    vision = model(family).config.vision_config.to_dict()
    config = AutoConfig.for_model("clip", text_config=text, vision_config=vision, projection_dim=16)
    clip = AutoModel.from_config(config)
    path = tempfile.mkdtemp(prefix=f"clip-{family}-")
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("scorer", SCORERS.names())
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_scorer_runs_on_every_family_or_is_refused_before_loading(family, scorer, tmp_path):
    from research.config import ConfigError, ModelConfig, RunConfig
    from research.experiment import resolve

    adapter, scorer_class = FAMILIES.get(family_of_configuration(family)), SCORERS.get(scorer)
    model(family).config.save_pretrained(tmp_path)  # config.json and an empty weights file: nothing is loaded
    (tmp_path / "model.safetensors").touch()
    cfg = RunConfig(scorers=[scorer], model=ModelConfig(name=family_of_configuration(family), path=str(tmp_path)))
    if scorer_class.needs_cls_saliency and not adapter.has_cls_saliency:
        with pytest.raises(ConfigError, match=f"scorer '{scorer}' ranks by the vision tower's CLS attention, which "
                                              f"{adapter.family} .* does not map onto its image tokens") as caught:
            resolve(cfg)
        assert "\n" not in str(caught.value)
        return
    if scorer_class.needs_clip_patches and not adapter.has_cls_saliency:
        with pytest.raises(ConfigError, match=f"scorer '{scorer}' reads the vision tower's patch states as the image "
                                              f"tokens one to one, which {adapter.family} .* does not give") as caught:
            resolve(cfg)
        assert "\n" not in str(caught.value)
        return
    if scorer_class.needs_vision_merging and not adapter.supports_vision_merging:
        with pytest.raises(ConfigError) as caught:
            resolve(cfg)  # refused before loading, from config.json alone
        assert str(caught.value) == vision_merging_refusal(adapter, scorer)  # one line
        with pytest.raises(UnsupportedModel) as caught:  # and by the engine, for a model built by hand
            forward(family, inputs(family), scorer=scorer_class(), plan=PruningPlan.of([-1], [0.5], relative=True))
        assert str(caught.value) == vision_merging_refusal(adapter, scorer)
        return
    assert resolve(cfg).model.adapter is adapter
    params = {"clip_path": clip_dir_for(family)} if scorer in ("atp", "cdpruner") else {}
    plan = PruningPlan.of([-1], [0.5], relative=True) if scorer_class.pre_llm else LAYER_PLAN
    batch = inputs(family)
    counts = (batch["input_ids"] == model(family).config.image_token_id).sum(1)
    _, record = forward(family, batch, scorer=scorer_class(**params), plan=plan)
    for stage, fraction in zip(record.kept, plan.keep):
        kept = (stage >= 0).sum(1)
        assert torch.equal(kept, torch.round(fraction * counts.double()).long())
        for r in range(len(counts)):  # real image tokens, each once
            real = stage[r][stage[r] >= 0]
            assert (batch["input_ids"][r, real] == model(family).config.image_token_id).all()
            assert len(set(real.tolist())) == len(real)


def test_bench_leaves_out_the_scorers_a_family_refuses_with_the_sweeps_reason():
    """``python -m research.bench --family F`` times what a sweep on F runs: a scorer F refuses before loading (CLS
    saliency, CLIP patches) is listed as not timed, with the sweep's one-line reason, instead of failing the run."""
    from research.bench import refused_scorers

    assert refused_scorers("llava15") == {}
    for family in CROP_FAMILIES:
        refused = refused_scorers(family)
        cls_scorers = {n for n in SCORERS.names() if SCORERS.get(n).needs_cls_saliency}
        assert cls_scorers <= set(refused) and "mixture" in cls_scorers
        assert all(f"which {family} " in reason and "\n" not in reason for reason in refused.values())
        assert "text_prior" not in refused and "fastv" not in refused


def test_budget_fractions_are_solved_on_the_nominal_count_and_kept_per_row():
    from tiny import plan

    from research.config import RunConfig

    cfg = RunConfig(scorers=["text_prior"], schedules=[{"name": "layers", "layers": [1, 3]}], budgets=[0.25, 36])
    fraction, tokens = plan(cfg, 6, 144)[1:]
    assert fraction.relative and not tokens.relative
    assert [k * 144 for k in fraction.keep] == pytest.approx(tokens.keep)
    plan = fraction.plan()
    assert [plan.stage_keep(0, n) for n in (144, 72)] == [round(plan.keep[0] * 144), round(plan.keep[0] * 72)]


def save_llava_next_checkpoint(path):
    """A tiny LLaVA-NeXT with the shapes word tokenizer and an anyres processor, saved as a local checkpoint."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from research.shapes_model.vocab import CHAT_TEMPLATE, IMAGE, build_tokenizer

    tokenizer = build_tokenizer()
    adapter = FAMILIES.get("llava_next")
    config = random_config(adapter.family, "tiny", 4, 2)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.pad_token_id, config.text_config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    torch.manual_seed(0)
    adapter.model_type()(config).save_pretrained(path)
    view = config.vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": view},
                                                 crop_size={"height": view, "width": view},
                                                 image_grid_pinpoints=config.image_grid_pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
                       vision_feature_select_strategy="default", image_token=IMAGE, chat_template=CHAT_TEMPLATE,
                       num_additional_image_tokens=1).save_pretrained(path)


@pytest.mark.slow
def test_a_sweep_runs_on_a_local_llava_next_checkpoint(tmp_path, capsys):
    """``model=llava_next model.path=...`` runs like the LLaVA path; a scorer the family cannot run stops first."""
    import csv

    from research.run import main

    save_llava_next_checkpoint(tmp_path / "ckpt")
    common = [f"model.path={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'runs'}", "data.limit=6",
              "eval.batch_size=3", "eval.latency_samples=1", "eval.decode_tokens=2", "budgets=[0.25]"]
    assert main(["experiment=main_table", "model=llava_next", "scorers=[text_prior,atp]", *common]) == 2
    assert not (tmp_path / "runs").exists()
    assert "ranks by the vision tower's CLS attention, which llava_next" in capsys.readouterr().err
    assert main(["experiment=main_table", "model=llava_next", "scorers=[text_prior,fastv,random]", *common]) == 0
    with open(tmp_path / "runs" / "main_table" / "summary.csv") as table:
        rows = list(csv.DictReader(table))
    assert [r["scorer"] for r in rows] == ["vanilla", "text_prior", "fastv", "random"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert all(float(r["flops_ratio"]) < 1 for r in rows[1:])
    for analysis in ("text_dynamics", "attention_shifts"):  # the attention analyses run on the family too
        assert main([f"experiment={analysis}", "model=llava_next", *common]) == 0
        assert (tmp_path / "runs" / analysis / "tensorboard").is_dir()


def test_no_model_class_is_named_outside_the_adapters():
    """Only ``research/models/`` names transformers model or config classes (the offline model's own
    definition and training code excepted); the rest asks the family registry. Auto classes are fine."""
    import re
    from pathlib import Path

    import transformers

    root = Path(__file__).resolve().parent.parent
    names = {n for n in dir(transformers) if n.endswith(("ForConditionalGeneration", "Model", "Config"))
             and not n.startswith(("Auto", "Pretrained", "PreTrained", "Generation", "Bits"))}
    allowed = ("research/models/", "research/shapes_model/", "research/train_offline_model.py")
    found = []
    for path in sorted(root.glob("*/**/*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("build/", ".")) or relative.startswith(allowed):
            continue
        for word in set(re.findall(r"\b[A-Z][A-Za-z0-9_]+\b", path.read_text())) & names:
            found.append(f"{relative}: {word}")
    assert not found, found


def test_model_name_must_match_the_checkpoint_family_or_be_auto(tmp_path):
    from research.config import ConfigError, ModelConfig, RunConfig
    from research.experiment import resolve

    model("qwen2_vl").config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()  # the checks read config.json alone
    for name in ("auto", "qwen2_vl"):
        cfg = RunConfig(scorers=["text_prior"], model=ModelConfig(name=name, path=str(tmp_path)))
        assert resolve(cfg).model.adapter is FAMILIES.get("qwen2_vl")
    cfg = RunConfig(scorers=["text_prior"], model=ModelConfig(name="llava15", path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"model=llava15 but .* \(family qwen2_vl\); use model=qwen2_vl or model=a"):
        resolve(cfg)
    cfg = RunConfig(scorers=["text_prior"], positions="compact", model=ModelConfig(name="auto", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="positions=compact renumbers 1-D positions; qwen2_vl's multimodal"):
        resolve(cfg)


@pytest.mark.parametrize("order", ["name-first", "path-first"])
def test_model_name_shorthand_survives_a_model_path_in_either_order(order):
    from research.config import load_config

    args = ["model=qwen2_vl", "model.path=/data/qwen2-vl"]
    cfg = load_config(["experiment=main_table", *(args if order == "name-first" else args[::-1])])
    assert (cfg.model.name, cfg.model.path) == ("qwen2_vl", "/data/qwen2-vl")


def text_sizes(config) -> dict:
    """The sizes and special ids of a random config's LLM, to build another LLM of the same size."""
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "pad_token_id", "bos_token_id", "eos_token_id")
    return {key: value for key, value in config.text_config.to_dict().items() if key in keys}


@cache
def eager_model(family: str):
    """The family's model with eager attention; per-head query / key norms (a Qwen3 LLM: Qwen3-VL, InternVL3.5)
    get random weights, so a signal that skips them differs clearly from the layer's attention."""
    m = random_model(family, num_layers=4, num_kv_heads=2, attn_implementation="eager")
    with torch.no_grad():
        for layer in adapter_for(m).decoder_layers:
            for norm in (getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.uniform_(0.2, 3.0)
    return m


def ministral3_mistral3(query_scaling_from: int = 16384, attention: str = "eager"):
    """Ministral 3 in transformers' format: a Mistral 3 whose LLM is a ``ministral3`` (YaRN rotary; queries scaled
    by ``1 + beta * log(1 + floor(position / query_scaling_from))``, exactly 1 below that position: 16384 in the
    released configs)."""
    adapter = FAMILIES.get("mistral3")
    config = random_config(adapter.family, "tiny", 4, 2)
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": query_scaling_from,
            "llama_4_scaling_beta": 0.1}
    config.text_config = AutoConfig.for_model("ministral3", **text_sizes(config), rope_parameters=rope,
                                              max_position_embeddings=16 * query_scaling_from)
    torch.manual_seed(0)
    m = adapter.model_type()(config).eval()
    m.set_attn_implementation(attention)
    return m


# LLMs of another kind in a registered family, for the attention-signal test only: (family, the model)
LLM_VARIANTS = {"mistral3_ministral3": ("mistral3", ministral3_mistral3)}


@pytest.mark.parametrize("family", [*FAMILY_NAMES, *LLM_VARIANTS])
def test_attention_signals_equal_transformers_eager_attention_weights(family):
    """The attention the scorers rank by (every query row, each layer's own view and the next layer's) is the
    attention transformers computes: its eager weights, head-averaged, from the same forward."""
    m = LLM_VARIANTS[family][1]() if family in LLM_VARIANTS else eager_model(family)
    family = LLM_VARIANTS[family][0] if family in LLM_VARIANTS else family
    adapter = FAMILIES.get(family_of_configuration(family))
    batch = random_inputs(m, QUESTIONS, image_sizes=IMAGE_SIZES.get(family))
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def observe(signals):
        seen["layer", signals.layer_idx] = signals.attention("all")
        if signals.layer_idx + 1 < adapter(m).num_layers:
            seen["next", signals.layer_idx + 1] = signals.next_layer.attention("all")

    with torch.no_grad(), PruningEngine(m, None, PruningPlan.of([], []), observe=observe):
        weights = m(**batch, output_attentions=True).attentions  # per layer [B, H, S, S]
    valid = batch["attention_mask"].bool()
    for (view, layer), mine in seen.items():
        expected = weights[layer].float().mean(1)  # [B, S, S]
        where = f"{view} view of layer {layer}"
        torch.testing.assert_close(mine[valid], expected[valid], atol=2e-6, rtol=0, msg=lambda m, w=where: f"{w}: {m}")


def mistral_llava_next(window: int):
    """A LLaVA-NeXT whose LLM is a Mistral attending within a sliding window of ``window`` tokens."""
    adapter = FAMILIES.get("llava_next")
    config = random_config(adapter.family, "tiny", 4, 2)
    config.text_config = AutoConfig.for_model("mistral", **text_sizes(config), sliding_window=window)
    torch.manual_seed(0)
    return adapter.model_type()(config).eval()


def test_a_sliding_window_shorter_than_the_image_is_refused_before_loading(tmp_path):
    from research.config import ConfigError, ModelConfig, RunConfig
    from research.experiment import resolve

    mistral = mistral_llava_next(24)  # the tiny LLaVA-NeXT's images give up to 80 tokens
    mistral.config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()  # the check reads config.json alone
    cfg = RunConfig(scorers=["fastv"], model=ModelConfig(name="llava_next", path=str(tmp_path)))
    expected = "attends within a sliding window of 24 tokens, shorter than 80 image tokens"
    with pytest.raises(ConfigError, match=expected) as caught:
        resolve(cfg)
    assert "\n" not in str(caught.value)
    with pytest.raises(UnsupportedModel, match=expected):
        PruningEngine(mistral, SCORERS.get("fastv")(), LAYER_PLAN)


def test_a_sequence_longer_than_the_sliding_window_is_refused_before_pruning():
    mistral = mistral_llava_next(90)
    batch = random_inputs(mistral, QUESTIONS, image_sizes=IMAGE_SIZES["llava_next"])
    length = batch["input_ids"].shape[1]
    assert length > 90
    for plan in (LAYER_PLAN, INTERFACE_PLAN):
        with pytest.raises(UnsupportedModel, match=f"window of 90 tokens, shorter than this sequence of {length}"):
            with torch.no_grad(), PruningEngine(mistral, scorer_for(plan), plan):
                mistral(**batch)
    # observing prunes nothing, so it runs
    with torch.no_grad(), PruningEngine(mistral, None, PruningPlan.of([], []), observe=lambda signals: None):
        mistral(**batch)


def test_a_sliding_window_longer_than_prompt_and_answer_prunes_like_a_full_window():
    """The window never binds, so the pruned model equals the same model without one (same weights)."""
    windowed, full = mistral_llava_next(200), mistral_llava_next(4096)
    batch = random_inputs(full, QUESTIONS, image_sizes=IMAGE_SIZES["llava_next"])
    outputs = []
    for m in (windowed, full):
        with torch.no_grad(), PruningEngine(m, scorer_for(INTERFACE_PLAN), INTERFACE_PLAN):
            outputs.append(m.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True, pad_token_id=0))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    torch.testing.assert_close(torch.stack(outputs[0].logits), torch.stack(outputs[1].logits), atol=1e-5, rtol=0)


# ---- merging (sparsevlm's recycling, an interface merge) on every family -------------------------------------
class GroupedMerge(EmbeddingNorm):
    """Keeps by embedding norm; merges the dropped image tokens into ``groups`` groups by their rank (``None``:
    each of the first 3 dropped tokens of a row alone). Each row's groups depend on that row alone."""

    def __init__(self, groups: int | None = 3) -> None:
        self.groups = groups

    def merge_groups(self, signals, vision_hidden, is_kept):
        dropped = signals.vision_valid & ~is_kept
        if self.groups is not None:
            return torch.where(dropped, signals.layout.vision_rank % self.groups, -1)
        order = dropped.long().cumsum(1) - 1
        return torch.where(dropped & (order < 3), order, -1)


def merging(family: str, batch: dict, plan: PruningPlan, scorer: GroupedMerge, steps: int = 3):
    m = model(family)
    with torch.no_grad(), PruningEngine(m, scorer, plan) as engine:
        out = m.generate(**batch, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=media_token_ids(family))
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1), engine.last


@pytest.mark.parametrize("batching", BATCHES)
@pytest.mark.parametrize("kind", ["layers", "interface"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_merges_keep_the_engine_properties_on_every_family(family, kind, batching):
    """A merged token (its group's mean, in its last member's slot) on every family: cached decode equals a no-cache
    recompute, each row of a padded batch equals the row alone, and groups of one token equal the drop of the same
    set (1e-6); left-padded, with an all-ones mask, and with no mask."""
    batch, plan = inputs(family, kind=batching), PLANS[kind]
    tokens, cached, record = merging(family, batch, plan, GroupedMerge())
    assert record.merged and all(bool((anchors >= 0).any()) for anchors in record.merged.values())
    recomputed = []
    for t in range(tokens.shape[1]):
        with torch.no_grad(), PruningEngine(model(family), GroupedMerge(), plan):
            recomputed.append(model(family)(**grown(batch, tokens[:, :t]), use_cache=False).logits[:, -1])
    torch.testing.assert_close(cached, torch.stack(recomputed, 1), atol=1e-4, rtol=0)
    padding = (attention_mask(batch) == 0).sum(1)
    for i in range(3):
        alone_tokens, alone_logits, alone = merging(family, row(batch, i), plan, GroupedMerge())
        for location, anchors in record.merged.items():
            mine = anchors[i][anchors[i] >= 0] - padding[i]
            assert torch.equal(mine, alone.merged[location][0][alone.merged[location][0] >= 0])
        assert torch.equal(tokens[i], alone_tokens[0])
        torch.testing.assert_close(cached[i], alone_logits[0], atol=1e-4, rtol=0)
    single, singles = forward(family, batch, scorer=GroupedMerge(groups=None), plan=plan)
    dropped, _ = forward(family, batch, scorer=None, plan=plan, replay=singles.kept)
    assert (single - dropped).abs().max() <= 1e-6


# ---- Mistral 3: only [IMG] tokens are prunable; [IMG_BREAK] / [IMG_END] stay ---------------------------------
def seen_positions(family: str, batch: dict, plan: PruningPlan, scorer, layer: int):
    """The record of a pruned forward and the position ids decoder layer ``layer`` receives (one row per batch row)."""
    m, seen = model(family), []
    with torch.no_grad(), PruningEngine(m, scorer, plan) as engine:
        # registered after the engine's own hook, so it sees the kwargs the engine hands the layer
        handle = adapter_for(m).decoder_layers[layer].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()), with_kwargs=True)
        try:
            m(**batch)
        finally:
            handle.remove()
    return engine.last, seen[0]


@pytest.mark.parametrize(("kind", "scorer"), [("layers", "text_prior"), ("layers", "fastv"), ("layers", "sparsevlm"),
                                              ("absolute", "fastv"), ("interface", "embedding_norm"),
                                              ("interface", "divprune")])
def test_mistral3_prunes_only_img_tokens_and_keeps_every_break_and_end_token(kind, scorer):
    """Mistral 3's image span is rows of [IMG] tokens each ended by [IMG_BREAK], the last by [IMG_END]: the kept set
    holds [IMG] slots only, and every layer after the last stage still sees every [IMG_BREAK] / [IMG_END] slot (and
    of the image slots exactly the kept ones)."""
    from research.models.testing import IMAGE_BREAK_ID, IMAGE_END_ID

    batch, plan = inputs("mistral3"), PLANS[kind]
    ids, image = batch["input_ids"], model("mistral3").config.image_token_id
    assert ((ids == IMAGE_BREAK_ID).sum(1) == torch.tensor([3, 3, 5])).all()  # one per row of patches but the last
    assert ((ids == IMAGE_END_ID).sum(1) == 1).all()
    chosen = EmbeddingNorm() if scorer == "embedding_norm" else SCORERS.get(scorer)()
    record, positions = seen_positions("mistral3", batch, plan, chosen, layer=3)
    positions = positions[0] if positions.dim() == 3 else positions  # [B, S'] (position ids are the input slots)
    for r in range(len(ids)):
        kept = torch.cat([stage[r][stage[r] >= 0] for stage in record.kept])
        assert (ids[r, kept] == image).all(), ids[r, kept]
        seen = set(positions[r].tolist())
        breaks = ((ids[r] == IMAGE_BREAK_ID) | (ids[r] == IMAGE_END_ID)).nonzero()[:, 0]
        assert set(breaks.tolist()) <= seen
        last = record.kept[-1][r]
        image_slots = (ids[r] == image).nonzero()[:, 0].tolist()
        assert seen & set(image_slots) == set(last[last >= 0].tolist())
        assert len(last[last >= 0]) < len(image_slots)  # something was pruned


def test_mistral3_image_span_is_the_processors_layout():
    """Rows of ``columns`` [IMG] then [IMG_BREAK], the last break [IMG_END] (transformers' ``PixtralProcessor.
    replace_image_token``), one [IMG] per (patch * merge)-pixel square of the image."""
    from research.models.testing import IMAGE_BREAK_ID, IMAGE_END_ID, pixtral_image_span

    img = model("mistral3").config.image_token_id
    assert pixtral_image_span(2, 3, img).tolist() == [img] * 3 + [IMAGE_BREAK_ID] + [img] * 3 + [IMAGE_END_ID]
    batch = inputs("mistral3")
    counts = (batch["input_ids"] == img).sum(1).tolist()
    assert counts == [h * w // 16 for h, w in IMAGE_SIZES["mistral3"]]  # 4-pixel merged patches (patch 2, merge 2)
    assert batch["image_sizes"].tolist() == [list(size) for size in IMAGE_SIZES["mistral3"]]


def test_mistral3_with_a_sliding_window_shorter_than_its_nominal_image_is_refused():
    """Mistral's v0.1-style window (its config's default: 4096) against Mistral 3's nominal 448-pixel image."""
    adapter = FAMILIES.get("mistral3")
    config = random_config("mistral3", "mid", 4, 2)
    assert adapter.vision_layout(config).nominal_tokens == 256
    config.text_config.sliding_window = 200
    with pytest.raises(UnsupportedModel, match="window of 200 tokens, shorter than 256 image tokens") as caught:
        adapter.check_config(config)
    assert "\n" not in str(caught.value)
    config.text_config.sliding_window = 4096
    adapter.check_config(config)  # longer than the image: pruned while the sequence fits (the engine checks it)


def test_mistral3_whose_queries_are_scaled_within_its_nominal_image_is_refused():
    """Ministral 3's LLM scales its queries from position ``original_max_position_embeddings`` on, which the
    engine's attention signals leave out: a config where that starts within the nominal image is refused in one
    line (the released 16384 is accepted: above it the scorers' attention would differ from the model's)."""
    adapter = FAMILIES.get("mistral3")
    adapter.check_config(ministral3_mistral3(16384).config)
    with pytest.raises(UnsupportedModel, match="scales its queries from position 16 on") as caught:
        adapter.check_config(ministral3_mistral3(16).config)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kind", ["layers", "interface"])
def test_deepstack_features_are_pruned_with_their_tokens_negative_controls(kind, monkeypatch):
    """Qwen3-VL adds DeepStack features to the outputs of its first language layers at the visual positions. The
    pruned forward equals the masked reference (above) because the engine adds them itself on the kept slots. Two
    negative controls: left to transformers, the features no longer fit a pruned sequence (the forward fails);
    taken out of the call but never added, the pruned logits differ from the masked reference."""
    family, plan = "qwen3_vl", PLANS[kind]
    batch = inputs(family)
    image = model(family).config.image_token_id

    def differs_from_reference() -> bool:
        pruned, record = forward(family, batch, scorer=scorer_for(plan), plan=plan)
        with masked_reference(family, batch, record):
            reference, _ = forward(family, batch)
        for r in range(batch["input_ids"].shape[0]):
            slots = kept_slots(batch, record, image, r)
            real = attention_mask(batch)[r, slots].bool()
            mine = pruned[r, pruned.shape[1] - len(slots):]
            if not torch.allclose(mine[real], reference[r, slots][real], atol=1e-4, rtol=0):
                return True
        return False

    assert not differs_from_reference()
    with monkeypatch.context() as patch:
        patch.setattr(FAMILIES.get(family), "deepstack_layers", classmethod(lambda cls, config: 0))
        with pytest.raises((IndexError, RuntimeError, ValueError)):
            forward(family, batch, scorer=scorer_for(plan), plan=plan)
    with monkeypatch.context() as patch:
        patch.setattr(PruningEngine, "_make_deepstack_hook", lambda self, idx: lambda module, args, output: None)
        assert differs_from_reference()


# ---- Gemma 3: sliding-window and global layers, each type with its own mask and rotary base ------------------
def differs_from_masked_reference(family: str, batch: dict, plan: PruningPlan) -> float:
    """The largest difference between the pruned forward and the masked reference, over the kept real slots."""
    pruned, record = forward(family, batch, scorer=scorer_for(plan), plan=plan)
    with masked_reference(family, batch, record):
        reference, _ = forward(family, batch)
    image, worst = model(family).config.image_token_id, 0.0
    for r in range(batch["input_ids"].shape[0]):
        slots = kept_slots(batch, record, image, r)
        real = attention_mask(batch)[r, slots].bool()
        mine = pruned[r, pruned.shape[1] - len(slots):]
        worst = max(worst, float((mine[real] - reference[r, slots][real]).abs().max()))
    return worst


def next_layer_signal_error(family: str) -> float:
    """The largest difference between the next-layer attention of every layer and transformers' eager weights."""
    m = eager_model(family)
    batch = random_inputs(m, QUESTIONS, image_sizes=IMAGE_SIZES.get(family))
    seen = {}

    def observe(signals):
        if signals.layer_idx + 1 < 4:
            seen[signals.layer_idx + 1] = signals.next_layer.attention("all")

    with torch.no_grad(), PruningEngine(m, None, PruningPlan.of([], []), observe=observe):
        weights = m(**batch, output_attentions=True).attentions
    valid = batch["attention_mask"].bool()
    return max(float((mine[valid] - weights[layer].float().mean(1)[valid]).abs().max()) for layer, mine in seen.items())


@pytest.mark.parametrize("kind", ["layers", "interface"])
def test_gemma3_layer_types_get_their_own_mask_and_rotary_negative_control(kind, monkeypatch):
    """Gemma 3's layers alternate sliding (rotary base 10k) and global (1M) attention (tiny: S, F, S, F). The
    engine slices each type's kwargs for the layers after a stage and rotates the next layer's keys with that
    layer's own rotary: the pruned forward equals the masked reference and the next-layer signals equal the eager
    weights. Negative control: an engine told every layer is of layer 0's type (every layer gets the first layer's
    kwargs) differs from both."""
    family, plan = "gemma3", PLANS[kind]
    batch = inputs(family)
    assert adapter_for(model(family)).layer_types() == ["sliding_attention", "full_attention"] * 2
    assert differs_from_masked_reference(family, batch, plan) <= 1e-4
    assert next_layer_signal_error(family) <= 2e-6
    with monkeypatch.context() as patch:
        patch.setattr(FAMILIES.get(family), "layer_types", lambda self: ["sliding_attention"] * self.num_layers)
        assert differs_from_masked_reference(family, batch, plan) > 1e-2
        assert next_layer_signal_error(family) > 1e-3


def test_gemma3_compact_positions_are_refused_in_one_line():
    with pytest.raises(UnsupportedModel, match="positions=compact is not supported on gemma3: its sliding and global "
                                               "layers rotate with different bases") as caught:
        PruningEngine(model("gemma3"), EmbeddingNorm(), PruningPlan.of([-1], [0.5], "compact", relative=True))
    assert "\n" not in str(caught.value)


def test_gemma3_sequence_longer_than_its_sliding_window_is_refused_before_pruning():
    """While the sequence fits the window the sliding layers' mask is the global one; a longer one is refused."""
    config = random_config("gemma3", "tiny", 4, 2)
    config.text_config.sliding_window = 24  # longer than the 16 image tokens, shorter than the prompts
    torch.manual_seed(0)
    gemma = FAMILIES.get("gemma3").model_type()(config).eval()
    batch = random_inputs(gemma, QUESTIONS)
    length = batch["input_ids"].shape[1]
    for plan in (LAYER_PLAN, INTERFACE_PLAN):
        with pytest.raises(UnsupportedModel, match=f"window of 24 tokens, shorter than this sequence of {length}"):
            with torch.no_grad(), PruningEngine(gemma, scorer_for(plan), plan):
                gemma(**batch)


def test_gemma3_a_type_whose_first_layer_runs_after_a_stage():
    """Pruning after layer 0 (sliding): the first global layer runs on the pruned sequence, so transformers sizes
    the global layers' decode mask on its shorter cache; the engine gives them layer 0's, sliced. The pruned
    forward equals the masked reference, cached decode the no-cache recompute, and each row the row alone."""
    family, plan = "gemma3", PruningPlan.of([0, 2], [0.5, 0.25], relative=True)
    batch = inputs(family)
    assert differs_from_masked_reference(family, batch, plan) <= 1e-4
    tokens, cached, record = greedy(family, batch, plan)
    recomputed = []
    for t in range(tokens.shape[1]):
        with torch.no_grad(), PruningEngine(model(family), None, plan, replay=record.kept):
            recomputed.append(model(family)(**grown(batch, tokens[:, :t]), use_cache=False).logits[:, -1])
    torch.testing.assert_close(cached, torch.stack(recomputed, 1), atol=1e-4, rtol=0)
    for i in range(3):
        alone_tokens, alone_logits, _ = greedy(family, row(batch, i), plan)
        assert torch.equal(tokens[i], alone_tokens[0])
        torch.testing.assert_close(cached[i], alone_logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["layers", "interface"])
def test_gemma3_static_cache_is_refused_in_one_line(kind):
    """generate() with a static cache hands the model one mask per layer type, sized on fixed caches (the sliding
    layers' on the window): the engine cannot read the padding from them nor remap them, and says so."""
    from research.pruning.compat import TransformersChanged

    plan = PLANS[kind]
    with pytest.raises(TransformersChanged, match="one prepared mask per layer type .*use a dynamic cache") as caught:
        with torch.no_grad(), PruningEngine(model("gemma3"), scorer_for(plan), plan):
            model("gemma3").generate(**inputs("gemma3"), max_new_tokens=2, do_sample=False,
                                     cache_implementation="static")
    assert "\n" not in str(caught.value)


class UnevenCounts(EmbeddingNorm):
    """Keeps by embedding norm, row ``r`` ``2 r`` tokens fewer than planned: shorter rows get filler slots."""

    def keep_counts(self, signals, planned):
        return [k - 2 * r for r, k in enumerate(planned)]


@pytest.mark.parametrize("batching", BATCHES)
def test_gemma3_decode_masks_follow_rows_that_keep_different_counts(batching):
    """At the interface rows keep different counts, so shorter ones get filler slots. In a decode step the model
    builds its per-type masks from the unpruned 2-D mask on the pruned cache; the engine hands the language model
    that mask remapped instead, so cached decode equals the no-cache recompute of the same kept set."""
    family, plan = "gemma3", PruningPlan.of([-1], [0.5], relative=True)
    batch = inputs(family, kind=batching)
    m = model(family)
    with torch.no_grad(), PruningEngine(m, UnevenCounts(), plan) as engine:
        out = m.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, suppress_tokens=media_token_ids(family))
    record, tokens = engine.last, out.sequences[:, batch["input_ids"].shape[1]:]
    assert [int((k >= 0).sum()) for k in record.kept[0]] == [8, 6, 4]
    recomputed = []
    for t in range(tokens.shape[1]):
        with torch.no_grad(), PruningEngine(m, None, plan, replay=record.kept):
            recomputed.append(m(**grown(batch, tokens[:, :t]), use_cache=False).logits[:, -1])
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(recomputed, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("setting", "value", "words"), [
    ("use_bidirectional_attention", True, "use_bidirectional_attention=True is not supported: every text token"),
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping=50.0 is not supported: the scorers' attention has no"),
])
def test_gemma3_configs_the_engine_cannot_prune_are_refused_in_one_line(setting, value, words):
    config = random_config("gemma3", "tiny", 4, 2)
    setattr(config.text_config, setting, value)
    with pytest.raises(UnsupportedModel, match=words) as caught:
        FAMILIES.get("gemma3").check_config(config)
    assert "\n" not in str(caught.value)
