"""The offline default: the training recipe (micro version, same code path) and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from research.data.shapes import ShapesVQA, training_scene
from research.models import MODELS, load_model
from research.pruning import PruningEngine, PruningPlan
from research.shapes_model.evaluate import predict, report
from research.shapes_model.modeling import ShapesModelConfig
from research.shapes_model.train import LlavaPhase, TrainConfig, llava_batch
from research.train_offline_model import run
from scorers import SCORERS

MICRO = ShapesModelConfig(
    vision_hidden=32, vision_layers=1, text_encoder_hidden=32, text_encoder_layers=1, projection_dim=16,
    llm_hidden=32, llm_layers=2, llm_heads=2, llm_intermediate=64,
)
SHIPPED = MODELS.get("shapes")()


def test_micro_training_runs_the_shipped_recipe(tmp_path):
    cfg = TrainConfig(clip_steps=3, clip_batch=4, llava_steps=3, llava_batch=4, questions_per_image=2, warmup=1)
    metrics = run(cfg, tmp_path, MICRO, eval_limit=10)
    assert {"vanilla", "chance", "majority", "oracle@25%", "random@10%"} <= set(metrics)
    assert all(0 <= v <= 1 for v in metrics["vanilla"].values())
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["samples"] == 10
    assert saved["recipe"]["command"] == "python -m research.train_offline_model" and saved["recipe"]["seed"] == 0
    assert len(saved["bars"]) == 5 and "## Bars" in (tmp_path / "MODEL_CARD.md").read_text()
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith("# shapes-llava")
    adapter, _ = load_model("shapes", str(tmp_path))
    from transformers import AutoModel

    clip = AutoModel.from_pretrained(tmp_path / "clip")  # the trained CLIP
    for (name, a), (_, b) in zip(adapter.vision_tower.state_dict().items(), clip.vision_model.state_dict().items()):
        assert torch.equal(a, b), f"the LLaVA vision tower must stay the trained CLIP tower ({name})"


@pytest.mark.slow
def test_phase_two_alone_keeps_the_given_clip_and_the_cards_notes(tmp_path):
    """``--clip DIR`` trains only the LLaVA on that CLIP pair, to the full recipe's weights when the pair is the
    full recipe's (phase 2 is re-seeded); a retrain keeps MODEL_CARD.md's hand notes."""
    from research.train_offline_model import NOTES

    cfg = TrainConfig(clip_steps=2, clip_batch=4, llava_steps=2, llava_batch=4, questions_per_image=2, warmup=1)
    run(cfg, tmp_path / "full", MICRO, eval_limit=10)
    notes = f"{NOTES}\n## What was tried\n\nhand-written\n"
    card = tmp_path / "probe" / "MODEL_CARD.md"
    card.parent.mkdir()
    card.write_text("# an older card\n\n" + notes)
    run(cfg, tmp_path / "probe", MICRO, eval_limit=10, clip_path=tmp_path / "full" / "clip")
    adapter, _ = load_model("shapes", str(tmp_path / "probe"))
    trained, _ = load_model("shapes", str(tmp_path / "full"))
    probe_weights, full_weights = adapter.model.state_dict(), trained.model.state_dict()
    assert probe_weights.keys() == full_weights.keys()
    for name, weight in full_weights.items():
        assert torch.equal(probe_weights[name], weight), name
    text = card.read_text()
    assert text.startswith("# shapes-llava") and "--clip" in text and text.endswith(notes)
    assert "an older card" not in text


def test_each_bar_of_the_default_model_flips_at_its_threshold():
    from research.data.shapes import QTYPES
    from research.train_offline_model import bars

    def metrics(vanilla=0.995, lowest=0.98, oracle=0.96, random10=0.80, recall=(0.3, 0.6, 0.59, 0.61, 0.2, 0.1, 0.1)):
        types = {t: 1.0 for t in QTYPES} | {"count": lowest}
        return {"vanilla": {"overall": vanilla, **types}, "oracle@25%": {"overall": oracle},
                "random@10%": {"overall": random10},
                "grounding": {"layers": list(range(len(recall))), "text_prior": {"recall": list(recall)}}}

    def met(m):
        return [row["met"] for row in bars(m).values()]

    assert met(metrics()) == [True] * 5  # recall >= 0.6 after layers 1 and 3
    assert met(metrics(vanilla=0.985)) == [False, True, True, True, True]
    assert met(metrics(lowest=0.965)) == [True, False, True, True, True]
    assert met(metrics(oracle=0.94)) == [True, True, False, True, True]  # loses 5.5 points
    assert met(metrics(random10=0.85)) == [True, True, True, False, True]  # loses 14.5 points
    assert met(metrics(recall=(0.9, 0.6, 0.5, 0.5, 0.5, 0.9, 0.9))) == [True] * 4 + [False]  # only 1-4 count
    assert met(metrics(recall=(0.9,))) == [True] * 4 + [False]  # a model without layers 1-4 does not meet it
    assert bars(metrics())["vanilla lowest type (count)"]["value"] == 0.98


def test_llava_batch_keeps_positions_and_the_needed_patches():
    scenes = [training_scene(i, 0, 3) for i in range(6)]
    batch = llava_batch(scenes, np.random.default_rng(0), drop_probability=1.0)
    for row, (scene, questions) in enumerate(scenes):
        shown = batch["image_index"][row]
        patches = set(shown[shown >= 0].tolist())
        needed = np.any([q.relevant.reshape(-1) for q in questions], 0) & scene.objects_mask.reshape(-1)
        assert set(np.flatnonzero(needed).tolist()) <= patches
        image_slots = (shown >= 0).nonzero()[:, 0]
        assert torch.equal(batch["position_ids"][row, image_slots], 2 + shown[image_slots])
        answers = batch["labels"][row][batch["labels"][row] >= 0]
        assert len(answers) == 2 * len(questions)  # answer word + </s> per turn


def test_question_and_caption_labels_are_the_next_words():
    from research.data.shapes import caption
    from research.shapes_model.vocab import EOS, build_tokenizer

    tok = build_tokenizer()
    scenes = [training_scene(i, 0, 3) for i in range(4)]
    batch = llava_batch(scenes, np.random.default_rng(0), drop_probability=0.0, captions=True)
    ids = batch["input_ids"]
    for name in ("labels", "question_labels", "caption_labels"):
        slots = (batch[name] >= 0).nonzero()
        assert torch.equal(batch[name][slots[:, 0], slots[:, 1]], ids[slots[:, 0], slots[:, 1] + 1]), name
    for row, (scene, questions) in enumerate(scenes):
        words = tok.convert_ids_to_tokens(batch["question_labels"][row][batch["question_labels"][row] >= 0])
        assert words == [w for q in questions for w in q.text.split()[1:]]  # every word but the first, "?" too
        words = tok.convert_ids_to_tokens(batch["caption_labels"][row][batch["caption_labels"][row] >= 0])
        assert words == caption(scene).split()[1:] + [EOS]
    dropped = llava_batch(scenes, np.random.default_rng(0), drop_probability=1.0, captions=True)
    assert not (dropped["caption_labels"] >= 0).any()  # no caption for an image with dropped tokens


def test_each_packed_branch_is_the_one_question_prompt():
    """A branch of a packed training row sees what the evaluation prompt shows: same logits at ASSISTANT:
    (a caption branch packed beside the questions changes nothing for them)."""
    from PIL import Image

    from research.models import LlavaAdapter
    from research.shapes_model.modeling import build_clip, build_llava
    from research.shapes_model.train import llava_logits
    from research.shapes_model.vocab import EOS, build_processor

    torch.manual_seed(0)
    model = build_llava(MICRO, build_clip(MICRO)).eval()
    scenes = [training_scene(i, 0, 5) for i in range(3)]
    batch = llava_batch(scenes, np.random.default_rng(0), drop_probability=0.0, captions=True)
    processor = build_processor()
    eos = processor.tokenizer.convert_tokens_to_ids(EOS)
    with torch.no_grad():
        packed = llava_logits(model, batch)  # [B, L, vocab]
        for row, (scene, questions) in enumerate(scenes):
            labels = batch["labels"][row]
            answer_slots = ((labels >= 0) & (labels != eos)).nonzero()[:, 0]
            images = [Image.fromarray(scene.image)] * len(questions)
            inputs = LlavaAdapter(model).build_inputs(processor, images, [q.text for q in questions])
            alone = model(**inputs, logits_to_keep=1).logits[:, -1]  # [Q, vocab], left padded
            torch.testing.assert_close(packed[row, answer_slots], alone, atol=1e-5, rtol=1e-5)
            answers = processor.tokenizer.convert_tokens_to_ids([q.answer for q in questions])
            assert labels[answer_slots].tolist() == answers


@pytest.mark.parametrize("weights", [(0.0, 0.0), (1.0, 1.0)],
                         ids=["answers_and_dense_only", "shipped_with_question_and_caption"])
def test_micro_llava_loss_decreases(weights):
    from research.shapes_model.modeling import build_clip, build_llava

    torch.manual_seed(0)
    model = build_llava(MICRO, build_clip(MICRO))
    module = LlavaPhase(model, TrainConfig(question_weight=weights[0], caption_weight=weights[1]))
    module.log_dict = lambda *args, **kwargs: None
    scenes = [training_scene(i, 0, 2) for i in range(8)]
    batch = llava_batch(scenes, np.random.default_rng(0), 0.5, captions=weights[1] > 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]  # it learns (3.8 -> 2.3 measured)


def test_shipped_model_is_small_and_complete():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= {p.name for p in files}
    assert (SHIPPED / "clip" / "config.json").is_file()


def test_shipped_model_accuracy_on_200_test_samples():
    adapter, processor = load_model("shapes")
    samples = list(ShapesVQA("test", size=200))
    result = report(samples, predict(adapter, processor, samples))
    assert result["overall"] > 0.85, result


@pytest.mark.parametrize("name", ["atp", "mixture"])
def test_interface_scorers_run_on_the_shipped_model(name):
    adapter, processor = load_model("shapes")
    samples = list(ShapesVQA("test", size=8))
    inputs = adapter.build_inputs(processor, [ShapesVQA.pil_image(s) for s in samples], [s.question for s in samples])
    with torch.no_grad(), PruningEngine(adapter.model, SCORERS.get(name)(), PruningPlan.of([-1], [36])) as engine:
        adapter.model(**inputs)
    assert engine.last.kept[0].shape == (8, 36)


def test_keep_metrics_counts_relevant_and_object_patches():
    from research.shapes_model.grounding import keep_metrics

    sample = ShapesVQA("test", size=1)[0]
    relevant, objects = sample.relevant.reshape(-1), sample.objects_mask.reshape(-1)
    all_relevant = np.flatnonzero(relevant)
    result = keep_metrics(all_relevant[None], [sample])
    assert result["recall"] == 1.0
    assert result["on_object"] == pytest.approx(objects[all_relevant].mean())
    half = all_relevant[: len(all_relevant) // 2]
    background = np.flatnonzero(~relevant & ~objects)[: len(half)]
    result = keep_metrics(np.concatenate([half, background])[None], [sample])
    assert result["recall"] == pytest.approx(len(half) / len(all_relevant))
    assert result["on_object"] == pytest.approx(objects[half].sum() / (2 * len(half)))


@pytest.mark.slow
def test_shipped_grounding_figures_reproduce():
    """metrics.json's grounding table is what the shipped model does (text_prior and pdrop after layer 1)."""
    from research.shapes_model.grounding import keep_metrics, kept_patches

    stored = json.loads((SHIPPED / "metrics.json").read_text())["grounding"]
    adapter, processor = load_model("shapes")
    samples = list(ShapesVQA("test", size=stored["samples"]))
    for name in ("text_prior", "pdrop"):
        measured = keep_metrics(kept_patches(adapter, processor, samples, name, 1, stored["keep"]), samples)
        for metric, value in measured.items():
            assert value == pytest.approx(stored[name][metric][1], abs=1e-6), (name, metric)


def test_token_profile_explains_the_engines_text_prior_figure():
    """The text_prior recall rebuilt from transformers' own attention weights is the engine's figure; the
    prior shares of each question position sum to at most 1."""
    from research.shapes_model.grounding import measure, token_profile

    profile = token_profile(SHIPPED, samples=8, positions=tuple(range(-7, 0)))  # shortest prompt: 6 words + ASSISTANT:
    engine = measure(SHIPPED, samples=8, scorers=("text_prior",))
    assert profile["text_prior"] == pytest.approx(engine["text_prior"]["recall"], abs=1e-6)
    assert all(0 <= sum(shares) <= 1 + 1e-5 for shares in profile["prior_share"])
    assert all(0 <= r <= 1 for recalls in profile["token_recall"] for r in recalls)
