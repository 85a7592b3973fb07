"""CDPruner keeps the tokens its authors' code keeps.

The reference is written here from Theia-4869/CDPruner (``llava/model/llava_arch.py``: ``encode_images``;
``clip_encoder.py``: ``forward``), run per sample as their code runs (one image), on what transformers itself
computes: the vision tower's hidden states of LLaVA's feature layer, the projected image features
(``get_image_features``), the CLIP checkpoint's text tower and projections; never on this framework's signals.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_inputs, tiny_llava
from transformers import AutoConfig, AutoModel, AutoTokenizer

from research.pruning import PruningEngine, PruningPlan
from research.shapes_model.vocab import build_tokenizer
from scorers import SCORERS
from scorers.cdpruner import dpp_greedy

QUESTIONS = [5, 11, 8]  # left padding on rows 0 and 2


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny CLIP (vision width = the tiny LLaVA's tower) and a word tokenizer, saved to disk."""
    torch.manual_seed(1)
    tokenizer = build_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=tokenizer.eos_token_id)
    vision = tiny_llava().config.vision_config.to_dict()
    clip = AutoModel.from_config(AutoConfig.for_model("clip", text_config=text, vision_config=vision,
                                                      projection_dim=16))
    path = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava("eager"), tiny_inputs(QUESTIONS)


# ---- the reference, from their code ---------------------------------------------------------------


def their_text_embeds(clip, tokenizer, question: str) -> torch.Tensor:
    """``CLIPVisionTower.forward``'s ``text_embeds`` (M, C): the tokens cut into ``max_position_embeddings``-long
    segments, zero-padded. The tiny word tokenizer adds no EOS; CLIP's own does: one is appended."""
    text_inputs = tokenizer(text=question, return_tensors="pt")
    eos = clip.config.text_config.eos_token_id
    if text_inputs.input_ids[0, -1] != eos:
        text_inputs = {k: torch.cat([v, v.new_full((1, 1), eos if k == "input_ids" else 1)], 1)
                       for k, v in text_inputs.items() if k in ("input_ids", "attention_mask")}
    max_position_embeddings = clip.config.text_config.max_position_embeddings
    text_segment = (text_inputs["input_ids"].shape[1] - 1) // max_position_embeddings + 1
    text_padding = max_position_embeddings * text_segment - text_inputs["input_ids"].shape[1]
    text_inputs = {
        k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, max_position_embeddings)
        for k, v in text_inputs.items()
    }
    return clip.get_text_features(**text_inputs).pooler_output


def their_encode_images(image_features, image_outputs, post_layernorm, visual_projection, text_embeds,
                        visual_token_num: int, sign: float = -1.0, theta: float | None = None) -> torch.Tensor:
    """``LlavaMetaForCausalLM.encode_images`` for one image: the sorted kept indices and the choice order.
    ``image_features``: the projector's output (B=1, N, D); ``image_outputs``: the feature layer's patches."""
    B, N, C = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = visual_projection(post_layernorm(image_outputs).float())
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (sign * relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        relevance = torch.exp(alpha * relevance)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    return their_kernel_greedy(kernel, visual_token_num)


def their_kernel_greedy(kernel: torch.Tensor, visual_token_num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast MAP loop of ``encode_images`` on a [1, N, N] kernel: (sorted kept, choice order)."""
    B, N, _ = kernel.shape
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    return torch.sort(select_idx.t()).values[0], select_idx[:, 0]


def reference(model, inputs, clip_dir: Path, keep: int, **options) -> tuple[list[tuple[set, torch.Tensor]], list]:
    """Per row: (kept input positions, choice order) of their code on transformers' own tensors; and the number of
    text segments of each row's question."""
    clip, tokenizer = AutoModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        tower = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
        patches = tower.hidden_states[model.config.vision_feature_layer][:, 1:]  # feature_select: 'patch'
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        result, segments = [], []
        for b in range(3):
            ids = inputs["input_ids"][b]
            columns = (ids == IMAGE_TOKEN_ID).nonzero()[:, 0]
            question = tokenizer.decode(ids[columns[-1] + 1:][ids[columns[-1] + 1:] != PAD_TOKEN_ID].tolist(),
                                        skip_special_tokens=True).strip()
            text = their_text_embeds(clip, tokenizer, question)
            segments.append(text.shape[0])
            kept, order = their_encode_images(features[b][None], patches[b : b + 1],
                                              model.model.vision_tower.post_layernorm, clip.visual_projection, text,
                                              keep, **options)
            result.append((set(columns[kept].tolist()), order))
    return result, segments


def engine_kept(model, inputs, scorer, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    seen = []
    score = scorer.score
    scorer.score = lambda signals: seen.append(score(signals)) or seen[-1]
    with torch.no_grad(), PruningEngine(model, scorer, PruningPlan.of([-1], [keep])) as engine:
        model(**inputs)
    return engine.last.kept[0], seen[0]


# ---- fidelity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {},  # their code: negative relevance
    {"relevance": "positive"},  # the paper's sign
    {"theta": 0.5},  # their commented-out exponential relevance
], ids=["code", "paper_sign", "theta"])
@pytest.mark.parametrize("keep", [8, 24])
def test_cdpruner_keeps_what_their_code_keeps_on_a_left_padded_batch(tiny, clip_dir, keep, options):
    """Per row of a left-padded batch of 3: kept set Jaccard 1.0 and the same choice order."""
    model, inputs = tiny
    assert_as_their_code(model, inputs, clip_dir, keep, options, segments=[1, 1, 1])


def test_cdpruner_a_question_longer_than_the_text_context_is_cut_into_segments_as_theirs(tiny, clip_dir):
    """Questions of 120 and 200 LLM tokens (the tiny CLIP's context: 64): 2 and 3 segments, relevance averaged."""
    model, _ = tiny
    assert_as_their_code(model, tiny_inputs([120, 5, 200]), clip_dir, 16, {}, segments=[2, 1, 3])


def assert_as_their_code(model, inputs, clip_dir, keep: int, options: dict, segments: list[int]) -> None:
    scorer = SCORERS.get("cdpruner")(clip_path=str(clip_dir), drop_text="", **options)
    kept, scores = engine_kept(model, inputs, scorer, keep)
    sign = -1.0 if options.get("relevance", "negative") == "negative" else 1.0
    expected, their_segments = reference(model, inputs, clip_dir, keep, sign=sign, theta=options.get("theta"))
    assert their_segments == segments
    jaccards, orders = [], []
    for b, (theirs, order) in enumerate(expected):
        mine = set(kept[b].tolist())
        jaccards.append(len(mine & theirs) / len(mine | theirs))
        columns = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero()[:, 0]
        orders.append(torch.equal(columns[scores[b].topk(keep).indices], columns[order]))
    assert jaccards == [1.0] * 3, f"Jaccard per row: {jaccards}"
    assert orders == [True] * 3


def test_cdpruner_greedy_breaks_ties_by_the_first_index_as_their_code():
    """Duplicate tokens (equal kernel rows, all diagonals 1): their loop and ``dpp_greedy`` choose alike."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    features = torch.cat([base[[2]], base, base[[4, 0]], torch.randn(5, 8, generator=g)])[None]  # 14 tokens
    unit = (features / features.norm(dim=-1, keepdim=True))[0]
    kernel = unit @ unit.t()
    _, theirs = their_kernel_greedy(kernel[None], 7)
    assert torch.equal(dpp_greedy(kernel, 7), theirs)


def test_cdpruner_the_relevance_sign_changes_the_kept_set(tiny, clip_dir):
    model, inputs = tiny
    code = engine_kept(model, inputs, SCORERS.get("cdpruner")(clip_path=str(clip_dir)), 8)[0]
    paper = engine_kept(model, inputs, SCORERS.get("cdpruner")(clip_path=str(clip_dir), relevance="positive"), 8)[0]
    assert not torch.equal(code, paper)


def test_cdpruner_drops_the_short_answer_instruction_from_the_question(clip_dir):
    from types import SimpleNamespace

    scorer = SCORERS.get("cdpruner")(clip_path=str(clip_dir))
    scorer._clip = SimpleNamespace(questions=lambda *args: ["what is red ? \nAnswer the question using a single "
                                                            "word or phrase."])
    interface = SimpleNamespace(input_ids=None, layout=SimpleNamespace(text=None, text_valid=None))
    assert scorer._questions(SimpleNamespace(interface=interface)) == ["what is red ?"]


@pytest.mark.parametrize("bad,message", [
    ({"relevance": "abs"}, "relevance 'abs' unknown; choose one of ['negative', 'positive']"),
    ({"theta": 1.0}, "theta 1.0 must be in [0, 1) or None"),
])
def test_cdpruner_options_are_validated(bad, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SCORERS.get("cdpruner")(**bad)
