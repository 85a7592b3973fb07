"""DART keeps the tokens its authors' code keeps.

The reference is written here from ZichenWen1/DART (VTC-Bench's vendored copy, ``external/DART/llava/model/
language_model/modeling_llama_self.py``: ``DART.get_retained_image_token`` and the keep-index lines of
``DART.forward``), run per sample as their code runs (a batch of one, image tokens from ``image_token_start_index``
for ``image_token_length``) on what transformers itself computes for that sample alone: layer ``K - 1``'s output
(``output_hidden_states``) through the LLM's final norm, and its keys as the KV cache stores them (after the
rotary embedding), repeated over query heads as ``repeat_kv`` does; never on this framework's signals. The engine
runs the left-padded batch of 3 and must keep, per row, what their code keeps for the row alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, row, tiny_inputs, tiny_llava
from transformers import Cache

from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

QUESTIONS = [5, 11, 8]  # left padding on rows 0 and 2
K = 2  # their --pruned_layer: prune before layer 2, i.e. after layer 1


# ---- the reference, from their code ---------------------------------------------------------------


def their_retained_image_tokens(last_layer_state, any_states, image_token_start_index, image_token_length,
                                max_num_trunction, pivot_image_token=4, pivot_text_token=4) -> set[int]:
    """``DART.get_retained_image_token`` (their LLaVA path, ``text_length=None``)."""
    token_topk = math.ceil(max_num_trunction // (pivot_image_token + pivot_text_token))
    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)
    k_states_image_token = any_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length:, :]
    k_states_image_token_l1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_l1_norm = torch.norm(k_states_query_token, p=1, dim=-1)
    image_indices = (k_states_image_token_l1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist()
    query_indices = (k_states_query_token_l1_norm.topk(pivot_text_token).indices + image_token_start_index
                     + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(
        image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return indices_set


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' / their ``repeat_kv``: [B, Hkv, S, hd] -> [B, Hkv * n_rep, S, hd]."""
    batch, kv_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, slen, head_dim)


def transformers_tensors(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer K-1's output through the final norm [1, L, D] and its keys as the KV cache stores them, repeated over
    query heads [1, H, L, hd], for one unpadded sample (their code runs a batch of one)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=True)
        cache = next(v for v in out.values() if isinstance(v, Cache))
        text = model.config.text_config
        keys = repeat_kv(cache.layers[K - 1].keys, text.num_attention_heads // text.num_key_value_heads)
        return model.model.language_model.norm(out.hidden_states[K]), keys


def theirs_per_row(model, inputs, max_num_trunction: int, **pivots) -> list[set[int]]:
    """Per row of the padded batch: the input positions their code keeps for that sample alone."""
    kept = []
    for b in range(inputs["input_ids"].shape[0]):
        alone = row(inputs, b)
        states, keys = transformers_tensors(model, alone)
        image = (alone["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[:, 0]
        retained = their_retained_image_tokens(states, keys, int(image[0]), len(image), max_num_trunction, **pivots)
        pad = int((inputs["attention_mask"][b] == 0).sum())
        kept.append({p + pad for p in retained})
    return kept


def kept_by_engine(model, inputs, keep: int, **options) -> tuple[list[set[int]], list[float]]:
    with torch.no_grad(), PruningEngine(model, SCORERS.get("dart")(**options), PruningPlan.of([K - 1], [keep])) as e:
        model(**inputs)
    return [set(row.tolist()) - {-1} for row in e.last.kept[0]], e.last.tokens_per_layer


def jaccards(mine: list[set[int]], theirs: list[set[int]]) -> list[float]:
    return [len(a & b) / len(a | b) for a, b in zip(mine, theirs)]


# ---- fidelity --------------------------------------------------------------------------------------


def with_random_final_norm(model):
    """A final norm whose weight is not all ones (random init leaves it so; then the norm would not change any
    cosine similarity and a scorer skipping it could not be told apart)."""
    g = torch.Generator().manual_seed(0)
    norm = model.model.language_model.norm
    norm.weight.data = torch.rand(norm.weight.shape, generator=g) * 2
    return model


@pytest.fixture(scope="module")
def tiny():
    return with_random_final_norm(tiny_llava("eager")), tiny_inputs(QUESTIONS)


@pytest.mark.parametrize("keep", [16, 32, 50])
def test_dart_code_budget_keeps_what_their_code_keeps_on_a_left_padded_batch(tiny, keep):
    """``budget=code`` with their ``max_num_trunction = keep``: Jaccard 1.0 per row, and the count their code
    keeps (4 pivots + 8 * (keep // 8): 20, 36, 52) is what the run reports."""
    model, inputs = tiny
    mine, tokens = kept_by_engine(model, inputs, keep, budget="code")
    theirs = theirs_per_row(model, inputs, keep)
    assert jaccards(mine, theirs) == [1.0] * 3
    expected = 4 + 8 * (keep // 8)
    assert [len(row) for row in mine] == [expected] * 3
    assert tokens[K:] == [expected] * (len(tokens) - K)


@pytest.mark.parametrize("keep", [20, 36])
def test_dart_planned_budget_is_their_code_where_the_count_divides(tiny, keep):
    """``budget=planned`` keeps exactly ``keep``: where ``keep - 4`` is a multiple of the 8 pivots it is their
    code at ``max_num_trunction = keep - 4`` (each pivot choosing ``(keep - 4) / 8``)."""
    model, inputs = tiny
    mine, _ = kept_by_engine(model, inputs, keep)
    assert jaccards(mine, theirs_per_row(model, inputs, keep - 4)) == [1.0] * 3


@pytest.mark.parametrize("keep", [3, 13, 27])
def test_dart_planned_budget_keeps_exactly_the_plans_count(tiny, keep):
    model, inputs = tiny
    mine, tokens = kept_by_engine(model, inputs, keep)
    assert [len(row) for row in mine] == [keep] * 3
    assert tokens[K:] == [keep] * (len(tokens) - K)


def test_dart_under_grouped_query_attention_repeats_the_keys_as_their_code():
    """Two key heads for four query heads: their L1 norm runs over ``repeat_kv``'s keys."""
    model, inputs = with_random_final_norm(tiny_llava("eager", num_kv_heads=2)), tiny_inputs(QUESTIONS)
    mine, _ = kept_by_engine(model, inputs, 24, budget="code")
    assert jaccards(mine, theirs_per_row(model, inputs, 24)) == [1.0] * 3


def test_dart_pivot_options_change_the_kept_set_as_their_code(tiny):
    """Two image and three text pivots (their ``--pivot_image_token`` / ``--pivot_text_token``)."""
    model, inputs = tiny
    mine, _ = kept_by_engine(model, inputs, 32, budget="code", pivot_image=2, pivot_text=3)
    assert mine != kept_by_engine(model, inputs, 32, budget="code")[0]
    theirs = theirs_per_row(model, inputs, 32, pivot_image_token=2, pivot_text_token=3)
    assert jaccards(mine, theirs) == [1.0] * 3


@pytest.mark.parametrize("bad, message", [
    ({"budget": "exact"}, "dart budget 'exact' unknown; choose one of ['planned', 'code']"),
    ({"pivot_image": 0}, "dart pivots must be"),
])
def test_dart_options_are_validated(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SCORERS.get("dart")(**bad)


def test_dart_acts_inside_the_llm_only():
    """It reads a decoder layer's keys and output: never at the vision-language interface."""
    cls = SCORERS.get("dart")
    assert not cls.pre_llm and cls.needs_llm_attention and not cls.needs_cls_saliency
