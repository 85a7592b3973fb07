"""SparseVLM keeps, counts and recycles what its authors' code does; merging after a decoder layer is exact.

The reference is written here from Gumpest/SparseVLMs (``modelling_sparse_llama.py``, ``score.py``,
``utils.py: cluster_and_merge``), per sample as their code runs (batch of one, no padding), on what
transformers itself computes: the LLM's input embeddings and the eager attention weights
(``output_attentions=True``) of each pruning layer, as the layer ran on the pruned sequence.

Merge properties, with a content-free merging scorer (its choice does not change as the answer grows):
cached decode == no-cache recompute; a row of a left-padded batch == the row alone; a merge whose groups
are single tokens == the drop that keeps the same slots.
"""

from __future__ import annotations

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, row, tiny_inputs, tiny_llava

from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

QUESTIONS = [5, 11, 8]  # left padding on rows 0 and 2


# ---- the reference, from their code ---------------------------------------------------------------


def their_raters(embeds: torch.Tensor, image: slice) -> torch.Tensor:
    """``t_token_idx``: text tokens (everything after the image) with relevance above the mean."""
    v_t, t_t = embeds[image], embeds[image.stop:]
    m_v_t = (v_t @ t_t.T).softmax(1).mean(0)
    return torch.where(m_v_t > m_v_t.mean())[0]


def their_cluster_and_merge(x: torch.Tensor, cluster_num: int, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``utils.cluster_and_merge`` for one sample ``x`` [N, C]: (merged [c, C], cluster of each token [N])."""
    n, c = x.shape
    dist_matrix = (x[:, None, :] - x[None, :, :]).norm(dim=-1, p=2) / (c**0.5)
    dist_nearest, _ = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp() + noise
    mask = (density[None, :] > density[:, None]).type(x.dtype)
    dist_max = dist_matrix.max()
    dist, _ = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    _, index_down = torch.topk(dist * density, k=cluster_num, dim=-1)
    idx_cluster = dist_matrix[index_down].argmin(dim=0)
    idx_cluster[index_down] = torch.arange(cluster_num)
    all_weight = torch.zeros(cluster_num, 1).index_add_(0, idx_cluster, torch.ones(n, 1)) + 1e-6
    merged = torch.zeros(cluster_num, c).index_add_(0, idx_cluster, x / all_weight[idx_cluster])
    return merged, idx_cluster


def their_stage(attn: torch.Tensor, vision: slice, text_start: int, raters: torch.Tensor, keep_rule, hidden):
    """One pruning layer of ``LlamaDynamicvitModel.forward`` on one unpadded sample.

    Returns (kept vision indices (ascending, of ``vision``), recycled groups [(member indices)], merged [c, D]).
    """
    relation_vis_text = attn.mean(0)[raters + text_start][:, vision]  # [n_r, V]
    v_token_num = relation_vis_text.shape[1]
    keep = keep_rule(relation_vis_text, v_token_num)
    relation = relation_vis_text.mean(0)
    if keep == v_token_num:
        return torch.arange(v_token_num), [], None
    kept = relation.topk(keep).indices.sort().values
    pruned = torch.tensor([i for i in range(v_token_num) if i not in set(kept.tolist())])
    m = int(len(pruned) * 0.3) + 1
    stage2 = pruned[relation[pruned].topk(m).indices]
    cluster_num = int(m / 10) + 1
    noise = torch.rand(m, generator=torch.Generator().manual_seed(0)) * 1e-6
    merged, labels = their_cluster_and_merge(hidden[vision][stage2], cluster_num, noise)
    groups = [stage2[labels == c] for c in range(cluster_num)]
    return kept, groups, merged


def fixed_rule(counts):
    def rule(relation_vis_text, v_token_num):  # score.py attn_postprocess_topk
        return min(next(counts), v_token_num - 1)
    return rule


def rank_rule(scale, bias, factor):
    """First release (attn_postprocess_rank); ``factor``: 64 image tokens of 576 (the scorer scales counts)."""
    def rule(relation_vis_text, v_token_num):
        rank = torch.linalg.matrix_rank(relation_vis_text.float()).item()
        return v_token_num if v_token_num == rank else min(int(int(rank * scale + bias) * factor), v_token_num - 1)
    return rule


@pytest.fixture(scope="module")
def eager():
    return tiny_llava("eager"), tiny_inputs(QUESTIONS)


def engine_run(model, inputs, scorer, plan):
    """The pruned eager forward, with transformers' attention weights of every layer (on the sequence each
    layer ran on), each pruning layer's output before the cut and the next layer's input after it."""
    outputs, next_inputs, handles = {}, {}, []
    for loc in plan.locations:
        layers = model.model.language_model.layers
        handles.append(layers[loc].register_forward_hook(lambda m, a, o, loc=loc: outputs.__setitem__(loc, o)))
        handles.append(layers[loc + 1].register_forward_pre_hook(
            lambda m, a, loc=loc: next_inputs.__setitem__(loc, a[0])))
    embeds = {}
    handles.append(model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: embeds.__setitem__("x", k["inputs_embeds"]), with_kwargs=True))
    try:
        with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        for h in handles:
            h.remove()
    outputs = {k: (v[0] if isinstance(v, tuple) else v) for k, v in outputs.items()}
    return engine.last, attentions, outputs, next_inputs, embeds["x"]


@pytest.mark.parametrize("variant,options,counts", [
    ("main", {"retain": 192}, lambda: iter([round(c * 64 / 576) for c in (300, 200, 110)])),
    ("v1", {"scale": 20.0, "bias": 3.0}, None),
])
def test_sparsevlm_raters_counts_and_recycled_tokens_equal_their_code(eager, variant, options, counts):
    """Per row of a left-padded batch of 3, every stage: the kept set, the count (fixed list or matrix rank),
    the recycled groups (their anchors) and the merged states equal the repository's computation."""
    model, inputs = eager
    plan = PruningPlan.of([1, 2, 3], [40, 30, 20], positions="compact")
    scorer = SCORERS.get("sparsevlm")(variant=variant, **options)
    record, attentions, outputs, next_inputs, embeds = engine_run(model, inputs, scorer, plan)
    padding = (inputs["attention_mask"] == 0).sum(1).tolist()
    merged_somewhere = False
    for b in range(3):
        ids = inputs["input_ids"][b, padding[b]:]
        image = (ids == IMAGE_TOKEN_ID).nonzero()[:, 0]
        first, num_text = int(image[0]), len(ids) - int(image[-1]) - 1
        raters = their_raters(embeds[b, padding[b]:], slice(first, first + len(image)))
        rule = fixed_rule(counts()) if variant == "main" else rank_rule(20.0, 3.0, 64 / 576)
        vision_orig = image + padding[b]  # input_ids indices of the current vision tokens
        for stage, loc in enumerate(plan.locations):
            seq = attentions[loc].shape[-1]
            v_num = len(vision_orig)
            start = seq - num_text - v_num  # this row's vision slots in the layer's (left-filled) sequence
            vision, attn = slice(start, start + v_num), attentions[loc][b]
            kept, groups, merged = their_stage(attn, vision, seq - num_text, raters, rule, outputs[loc][b])
            anchors = sorted(int(g.max()) for g in groups)
            expected = sorted(kept.tolist() + anchors)
            got = record.kept[stage][b]
            assert got[got >= 0].tolist() == vision_orig[expected].tolist(), (b, stage)
            got_anchors = record.merged.get(loc, torch.empty(3, 0, dtype=torch.long))[b]
            assert got_anchors[got_anchors >= 0].tolist() == vision_orig[anchors].tolist(), (b, stage)
            after = next_inputs[loc][b]
            new_start = after.shape[0] - num_text - len(expected)
            for c, members in enumerate(groups):  # the merged token sits in its last member's slot
                slot = new_start + expected.index(int(members.max()))
                torch.testing.assert_close(after[slot], merged[c], rtol=1e-5, atol=1e-6)
                merged_somewhere = True
            vision_orig = vision_orig[expected]
    assert merged_somewhere


def test_sparsevlm_fixed_lists_give_their_average_tokens():
    """main, 576 tokens, 32 layers: 300/200/110 kept run as 309/204/113 with the merged ones: 192 on average."""
    from scorers.sparsevlm import FIXED_COUNTS, recycled_count

    for retain, counts in FIXED_COUNTS.items():
        per_layer, remaining, previous = [576] * 32, 576, -1
        for loc, keep in zip([2, 6, 15], counts):
            remaining = keep + recycled_count(remaining - keep)[1]
            per_layer[loc:] = [remaining] * (32 - loc)
            previous = loc
        assert previous == 15 and int(sum(per_layer) / 32) == retain


# ---- merge properties ------------------------------------------------------------------------------


class GroupedDrop:
    """Keeps the image tokens of the highest ``(rank * 37) % 64`` and merges dropped ones by ``rank % groups``
    (singletons: ``groups=None`` merges each of the first ``singles`` dropped tokens alone)."""

    def __init__(self, groups: int | None = 3, singles: int = 4) -> None:
        self.groups, self.singles = groups, singles

    def score(self, signals):
        return ((signals.layout.vision_rank * 37) % 64).float()

    def merge_groups(self, signals, vision_hidden, is_kept):
        dropped = signals.vision_valid & ~is_kept
        if self.groups is not None:
            return torch.where(dropped, signals.layout.vision_rank % self.groups, -1)
        order = dropped.long().cumsum(1) - 1  # rank among the row's dropped tokens
        return torch.where(dropped & (order < self.singles), order, -1)


def greedy(model, inputs, scorer, plan, steps=4, **kwargs):
    with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1), engine.last


MERGE_LOCATIONS = {"after-layers": [1, 3], "interface": [-1, 3]}  # merged after a decoder layer / at the interface


@pytest.mark.parametrize("where", MERGE_LOCATIONS)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cached_decode_after_a_merge_equals_no_cache_recompute(positions, cache, where):
    model, inputs = tiny_llava(), tiny_inputs(QUESTIONS)
    locations = MERGE_LOCATIONS[where]
    plan = PruningPlan.of(locations, [24, 10], positions=positions)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    tokens, cached, record = greedy(model, inputs, GroupedDrop(), plan, **extra)
    assert set(record.merged) == set(locations) and (record.merged[locations[0]] >= 0).sum(1).tolist() == [3, 3, 3]
    recomputed = []
    for t in range(tokens.shape[1]):
        grown = {"input_ids": torch.cat([inputs["input_ids"], tokens[:, :t]], 1),
                 "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :t])], 1),
                 "pixel_values": inputs["pixel_values"]}
        with torch.no_grad(), PruningEngine(model, GroupedDrop(), plan) as engine:
            recomputed.append(model(**grown, use_cache=False).logits[:, -1])
        assert all(torch.equal(a, b) for a, b in zip(engine.last.kept, record.kept))
    torch.testing.assert_close(cached, torch.stack(recomputed, 1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scorer,where", [("grouped", "after-layers"), ("grouped", "interface"),
                                          ("sparsevlm", "after-layers")])
def test_a_row_with_merges_equals_the_row_alone(scorer, where):
    model, inputs = tiny_llava(), tiny_inputs(QUESTIONS)
    plan = PruningPlan.of(MERGE_LOCATIONS[where], [24, 10], positions="compact")
    make = {"grouped": GroupedDrop, "sparsevlm": SCORERS.get("sparsevlm")}[scorer]
    tokens, logits, record = greedy(model, inputs, make(), plan)
    assert record.merged
    padding = (inputs["attention_mask"] == 0).sum(1)
    for i in range(3):
        alone_tokens, alone_logits, alone = greedy(model, row(inputs, i), make(), plan)
        for stage in range(2):
            assert torch.equal(record.kept[stage][i] - padding[i], alone.kept[stage][0])
        for loc, anchors in record.merged.items():
            mine = anchors[i][anchors[i] >= 0] - padding[i]
            assert torch.equal(mine, alone.merged[loc][0][alone.merged[loc][0] >= 0])
        assert torch.equal(tokens[i], alone_tokens[0])
        torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("where", MERGE_LOCATIONS)
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_a_merge_of_single_tokens_equals_dropping_the_same_set(positions, where):
    """Groups of one token: the merged token is that token (its state, position, mask and cache slot), so the
    forward equals a plain drop that keeps the same slots (replayed)."""
    model, inputs = tiny_llava(), tiny_inputs(QUESTIONS)
    plan = PruningPlan.of(MERGE_LOCATIONS[where], [24, 10], positions=positions)
    with torch.no_grad(), PruningEngine(model, GroupedDrop(groups=None), plan) as engine:
        merged = model(**inputs).logits
    record = engine.last
    assert [(m >= 0).sum(1).tolist() for m in record.merged.values()] == [[4, 4, 4], [4, 4, 4]]
    with torch.no_grad(), PruningEngine(model, None, plan, replay=record.kept):
        dropped = model(**inputs).logits
    assert merged.shape == dropped.shape and (merged - dropped).abs().max() <= 1e-6  # the pruned sequences' logits
    # negative control: real groups (3 per stage) are not a drop
    with torch.no_grad(), PruningEngine(model, GroupedDrop(), plan) as engine:
        grouped = model(**inputs).logits
    with torch.no_grad(), PruningEngine(model, None, plan, replay=engine.last.kept):
        assert (grouped - model(**inputs).logits).abs().max() > 1e-4


def test_a_scorer_without_merge_groups_prunes_as_before():
    """Nothing merged, no ``merged`` entries; the same kept sets and logits as the same scorer without the hook."""
    model, inputs = tiny_llava(), tiny_inputs(QUESTIONS)
    plan = PruningPlan.of([1, 3], [24, 10])

    class NoMerge(GroupedDrop):
        def merge_groups(self, signals, vision_hidden, is_kept):
            return None

    class Plain:
        score = GroupedDrop.score

    runs = []
    for scorer in (NoMerge(), Plain()):
        with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
            runs.append((model(**inputs).logits, engine.last))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1].merged == {}
    assert runs[0][1].tokens_per_layer == plan.tokens_per_layer(6, 64)


def test_bad_options_and_merge_groups_fail_in_one_line():
    with pytest.raises(ValueError, match=r"variant 'v2' unknown; choose one of \['main', 'v1'\]"):
        SCORERS.get("sparsevlm")(variant="v2")
    with pytest.raises(ValueError, match=r"retain 100 has no 'main' counts .* \[64, 96, 128, 192\]"):
        SCORERS.get("sparsevlm")(retain=100)

    class MergesKept(GroupedDrop):
        def merge_groups(self, signals, vision_hidden, is_kept):
            return torch.where(is_kept, 0, -1)

    model, inputs = tiny_llava(), tiny_inputs(QUESTIONS)
    with pytest.raises(ValueError, match="merges kept or padding vision tokens") as caught:
        with torch.no_grad(), PruningEngine(model, MergesKept(), PruningPlan.of([1], [24])):
            model(**inputs)
    assert "\n" not in str(caught.value)


def test_sparsevlm_declares_it_needs_one_axis_positions():
    """Its protocol renumbers positions (their code, prefill and decode): the harness refuses families whose
    rotary positions have several axes before loading (qwen2_vl, qwen2_5_vl)."""
    assert SCORERS.get("sparsevlm").needs_compact_positions is True


def test_overlay_patches_leave_out_the_padding_of_rows_that_keep_fewer():
    """Rank-adaptive counts differ per row: the overlay's per-row patches are that row's own, none negative."""
    from types import SimpleNamespace

    from research.evaluation import kept_patches
    from research.models import adapter_for

    model, inputs = tiny_llava(), tiny_inputs(QUESTIONS)
    plan = PruningPlan.of([1, 3], [24, 10], positions="compact")
    scorer = SCORERS.get("sparsevlm")(variant="v1", scale=20.0, bias=3.0)
    module = SimpleNamespace(plan=plan, model=model, adapter=adapter_for(model), inputs=lambda samples: inputs,
                             engine=lambda: PruningEngine(model, scorer, plan))
    with torch.no_grad():
        patches = kept_patches(module, [None] * 3)
    with torch.no_grad(), PruningEngine(model, scorer, plan) as engine:
        model(**inputs)
    counts = [(k >= 0).sum(1).tolist() for k in engine.last.kept]
    assert len({tuple(c) for c in counts}) > 1 or len(set(counts[0])) > 1  # rows keep different numbers
    assert [[len(p) for p in row] for row in patches] == [list(c) for c in zip(*counts)]
    assert all((p >= 0).all() and (p < 64).all() for row in patches for p in row)
