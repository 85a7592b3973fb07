"""Training recipe of the offline default, in two Lightning phases (LLaVA's: align the vision side, then tune).

Phase 1, the CLIP pair. The vision tower (ViT with a CLS token) and a small text encoder learn, on
scenes from the generator: per-patch colour, shape, grid cell and the number of objects of the patch's
colour (dense auxiliary labels), patch embedding <-> text embedding of the patch's concept ("red
circle"; "nothing" for background) by a CLIP softmax over concepts, question embedding -> its relevant
patches (softmax over patches), and CLS embedding -> the concepts present. This is what ATP's CLS
attention and CLIP similarity read.

Phase 2, the LLaVA. The vision tower is frozen (as in LLaVA-1.5); the MLP projector and a Llama LLM
are trained from scratch. Three choices make a from-scratch 8-layer LLM learn to look things up in
144 image tokens within the time budget (each measured in 200-300-step probes before the full run):

- branch packing: every image carries 12 questions, each a branch that attends to the image prefix and
  to itself only, at the positions of the one-question evaluation prompt (``llava_batch``), so one pass
  over the 146-token prefix trains 12 answers instead of one;
- dense targets through the LLM: at each image token the LM head must name the patch's colour, shape,
  grid cell and colour count as words (``LlavaPhase.dense_loss``), so image tokens carry their content in
  the vocabulary the answers are read from;
- token dropping: in half of the sequences the image tokens that are not object patches some question
  depends on are dropped at a random rate (kept tokens keep their original positions), so answers depend
  on which tokens are present, not on how many (a model that saw only complete images counts by the
  share of image tokens of a colour, which pruning changes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from transformers import CLIPModel

from research.data.shapes import (
    COLOURS,
    NOTHING,
    NUM_PATCHES,
    NUMBERS,
    POSITIONS,
    SHAPES,
    caption,
    training_scene,
)
from research.shapes_model.modeling import (
    DenseHeads,
    ShapesModelConfig,
    build_clip,
    build_llava,
    patch_cells,
    pixel_values,
)
from research.shapes_model.vocab import EOS, build_tokenizer

CONCEPTS = [f"{c} {s}" for c in COLOURS for s in SHAPES] + [NOTHING]  # index 24 = background
PREFIX, PADDING = -1, -2  # branch ids of the shared image prefix and of padding (llava_batch)


@dataclass
class TrainConfig:
    """Recipe of the shipped model (``python -m research.train_offline_model`` reproduces it)."""

    seed: int = 0
    clip_steps: int = 600
    clip_batch: int = 64
    clip_lr: float = 2e-3
    llava_steps: int = 1900
    llava_batch: int = 32
    llava_lr: float = 1e-3
    questions_per_image: int = 12
    dense_weight: float = 1.0  # dense targets through the LLM (LlavaPhase.dense_loss)
    drop_probability: float = 0.5  # share of sequences whose irrelevant image tokens are randomly dropped
    # Grounding recipe (issues 16, 30): see MODEL_CARD.md "Grounding recipe".
    question_weight: float = 3.0  # language-modelling loss on the question words (LlavaPhase.training_step)
    caption_weight: float = 1.0  # language-modelling loss on a scene caption branch (0 = no caption branch)
    warmup: int = 100
    threads: int = 2


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% (a multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _words(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(text.split())


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


class SceneBatches(IterableDataset):
    """Endless batches of training scenes; batch ``i`` is the same for the same seed everywhere."""

    def __init__(self, batch_size: int, seed: int, questions: int, build) -> None:
        self.batch_size, self.seed, self.questions, self.build = batch_size, seed, questions, build

    def __iter__(self) -> Iterator[dict]:
        index = 0
        while True:
            scenes = [
                training_scene(index * self.batch_size + i, self.seed, self.questions) for i in range(self.batch_size)
            ]
            yield self.build(scenes, np.random.default_rng([self.seed, 7, index]))
            index += 1


def patch_labels(scenes: list) -> tuple[Tensor, Tensor]:
    """([B, P], [B, P]) int64 colour and shape label of every patch (0 = background, else 1 + index)."""
    colour = torch.from_numpy(np.stack([s.patch_colour.reshape(-1) for s in scenes])).long()
    shape = torch.from_numpy(np.stack([s.patch_shape.reshape(-1) for s in scenes])).long()
    return colour, shape


def colour_counts(scenes: list) -> Tensor:
    """[B, P] the number of objects in the image with each patch's colour (0 for background patches)."""
    per_colour = torch.zeros(len(scenes), len(COLOURS) + 1, dtype=torch.long)  # column 0 = background
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            per_colour[i, 1 + COLOURS.index(obj.colour)] += 1
    return per_colour.gather(1, patch_labels(scenes)[0])


# ---- phase 1: the CLIP pair --------------------------------------------------------------------
def clip_batch(scenes: list, rng: np.random.Generator, tokenizer=None) -> dict:
    tokenizer = tokenizer or build_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(EOS)
    images = torch.from_numpy(np.stack([s.image for s, _ in scenes]))
    colour, shape = patch_labels([scene for scene, _ in scenes])  # [B, P] each
    background = len(CONCEPTS) - 1
    concept = torch.where(colour > 0, (colour - 1) * len(SHAPES) + (shape - 1).clamp(min=0), background)
    present = torch.zeros(len(scenes), len(CONCEPTS))
    for i, (scene, _) in enumerate(scenes):
        for obj in scene.objects:
            present[i, COLOURS.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)] = 1
    questions = [qs[int(rng.integers(len(qs)))] for _, qs in scenes]
    return {
        "colour_count": colour_counts([scene for scene, _ in scenes]),
        "pixel_values": pixel_values(images),
        "colour": colour, "shape": shape, "concept": concept, "present": present,
        "question_ids": _pad([[bos, *_words(tokenizer, q.text), eos] for q in questions], tokenizer.pad_token_id),
        "relevant": torch.from_numpy(np.stack([q.relevant.reshape(-1) for q in questions])),
    }


class ClipPhase(L.LightningModule):
    def __init__(self, clip, cfg: TrainConfig) -> None:
        super().__init__()
        self.clip, self.cfg = clip, cfg
        self.heads = DenseHeads(clip.config.vision_config.hidden_size)
        tok = build_tokenizer()
        eos = tok.convert_tokens_to_ids(EOS)
        concept_ids = [[tok.bos_token_id, *_words(tok, c), eos] for c in CONCEPTS]
        self.register_buffer("concept_ids", _pad(concept_ids, tok.pad_token_id), persistent=False)
        self.register_buffer("cells", patch_cells()[None], persistent=False)

    def text_embeddings(self, ids: Tensor) -> Tensor:
        mask = (ids != self.clip.config.text_config.pad_token_id).long()
        return F.normalize(self.clip.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)

    def training_step(self, batch: dict, step: int) -> Tensor:
        out = self.clip.vision_model(pixel_values=batch["pixel_values"])
        patches = out.last_hidden_state[:, 1:]  # [B, P, D]
        colour_logits, shape_logits, cell_logits, count_logits = self.heads(patches)
        cells = self.cells.expand(patches.shape[0], -1)
        dense = (
            F.cross_entropy(colour_logits.flatten(0, 1), batch["colour"].flatten())
            + F.cross_entropy(shape_logits.flatten(0, 1), batch["shape"].flatten())
            + F.cross_entropy(cell_logits.flatten(0, 1), cells.flatten())
            + F.cross_entropy(count_logits.flatten(0, 1), batch["colour_count"].flatten())
        )
        post_norm = self.clip.vision_model.post_layernorm
        patch_emb = F.normalize(self.clip.visual_projection(post_norm(patches)), dim=-1)  # [B, P, E]
        concept_emb = self.text_embeddings(self.concept_ids)  # [C, E]
        scale = self.clip.logit_scale.exp().clamp(max=100)
        concept = F.cross_entropy((scale * patch_emb @ concept_emb.T).flatten(0, 1), batch["concept"].flatten())
        question_emb = self.text_embeddings(batch["question_ids"])  # [B, E]
        log_p = torch.log_softmax(scale * torch.einsum("bpe,be->bp", patch_emb, question_emb), dim=-1)
        relevance = -torch.logsumexp(log_p.masked_fill(~batch["relevant"], float("-inf")), dim=-1).mean()
        cls_emb = F.normalize(self.clip.visual_projection(out.pooler_output), dim=-1)
        presence = F.binary_cross_entropy_with_logits(
            scale * cls_emb @ concept_emb[:-1].T - scale / 2, batch["present"][:, :-1]
        )
        loss = dense + concept + relevance + presence
        self.log_dict({"loss": loss, "dense": dense, "concept": concept, "relevance": relevance}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.cfg.clip_lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _schedule(s, self.cfg.clip_steps, self.cfg.warmup)
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]


# ---- phase 2: the LLaVA --------------------------------------------------------------------------
def llava_batch(
    scenes: list, rng: np.random.Generator, drop_probability: float, tokenizer=None, captions: bool = False
) -> dict:
    """Branch-packed sequences: one image prefix, then every question of the scene as its own branch.

    Row layout ``<s> USER: <image>*n | q1 ASSISTANT: a1 </s> | q2 ASSISTANT: a2 </s> | ...`` (right padded).
    ``attention_mask`` [B, 1, L, L] (additive float) lets each branch attend to the prefix and to itself
    only, and each branch has the positions of a one-question prompt (``2 + 144`` onwards). So every
    branch is exactly the evaluation prompt ``<s> USER: <image>*144 q ASSISTANT:``, and one pass over the
    image serves all its questions (the image prefix costs the same with 1 or 12 questions).

    ``image_index`` [B, L] holds the patch each image slot shows (-1 for text); dropped patches are
    simply absent, and ``position_ids`` keep every token's position in the complete sequence.
    ``labels`` [B, L] is the token each position must predict (answer word after ``ASSISTANT:``, then
    ``</s>``), already shifted; ``question_labels`` [B, L] the next question word at every question word
    but the last (the first word follows the shared prefix, so it has no position of its own to be
    predicted from). With ``captions``, rows whose image is complete get one more branch, the scene's
    caption (``shapes.caption``) then ``</s>``, whose next words are ``caption_labels`` [B, L].
    """
    tok = tokenizer or build_tokenizer()
    user, assistant = tok.convert_tokens_to_ids(["USER:", "ASSISTANT:"])
    eos = tok.convert_tokens_to_ids(EOS)
    rows, labels, question_labels, caption_labels = [], [], [], []
    image_index, positions, branches = [], [], []
    for scene, questions in scenes:
        kept = np.arange(NUM_PATCHES)
        dropped = rng.random() < drop_probability
        if dropped:
            # every object patch an answer depends on stays; everything else is kept at a random rate
            needed = np.any([q.relevant.reshape(-1) for q in questions], axis=0) & scene.objects_mask.reshape(-1)
            others = np.flatnonzero(~needed)
            extra = rng.random(len(others)) < rng.random()
            kept = np.sort(np.concatenate([np.flatnonzero(needed), others[extra]]))
        ids = [tok.bos_token_id, user] + [tok.pad_token_id] * len(kept)
        pos = [0, 1] + [2 + int(p) for p in kept]
        target = [-100] * len(ids)
        question_target = [-100] * len(ids)
        caption_target = [-100] * len(ids)
        patch = [-1, -1] + [int(p) for p in kept]
        branch = [PREFIX] * len(ids)
        for j, q in enumerate(questions):
            words = _words(tok, q.text) + [assistant]
            answer = [*_words(tok, q.answer), eos]
            ids += words + answer
            target += [-100] * (len(words) - 1) + answer + [-100]  # ASSISTANT: -> answer -> </s>
            question_target += words[1:-1] + [-100] * (2 + len(answer))  # word -> next word, up to "?"
            caption_target += [-100] * (len(words) + len(answer))
            patch += [-1] * (len(words) + len(answer))
            pos += list(range(2 + NUM_PATCHES, 2 + NUM_PATCHES + len(words) + len(answer)))
            branch += [j] * (len(words) + len(answer))
        if captions and not dropped:  # a caption names every object: only for complete images
            words = [*_words(tok, caption(scene)), eos]
            ids += words
            target += [-100] * len(words)
            question_target += [-100] * len(words)
            caption_target += words[1:] + [-100]
            patch += [-1] * len(words)
            pos += list(range(2 + NUM_PATCHES, 2 + NUM_PATCHES + len(words)))
            branch += [len(questions)] * len(words)
        rows.append(ids), labels.append(target), image_index.append(patch), positions.append(pos)
        question_labels.append(question_target), caption_labels.append(caption_target), branches.append(branch)
    images = torch.from_numpy(np.stack([s.image for s, _ in scenes]))
    colour, shape = patch_labels([scene for scene, _ in scenes])  # [B, P] each
    branch = _pad(branches, PADDING)  # [B, L]
    width = branch.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (branch[:, None, :] == branch[:, :, None]) | (branch[:, None, :] == PREFIX)  # [B, L(query), L(key)]
    allowed = causal & same
    return {
        "pixel_values": pixel_values(images),
        "input_ids": _pad(rows, tok.pad_token_id),
        "labels": _pad(labels, -100),
        "question_labels": _pad(question_labels, -100),
        "caption_labels": _pad(caption_labels, -100),
        "image_index": _pad(image_index, -1),
        "position_ids": _pad(positions, 0),
        "attention_mask": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None],
        "patch_colour": colour, "patch_shape": shape,
        "colour_count": colour_counts([scene for scene, _ in scenes]),
    }


def llava_logits(model, batch: dict) -> Tensor:
    """Forward through the real modules with dropped image tokens: [B, L, vocab]."""
    with torch.no_grad():  # the vision tower is frozen
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    features = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])  # [B, P, D]
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    index = batch["image_index"]
    gathered = features.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, features.shape[-1]))
    embeds = torch.where((index >= 0)[..., None], gathered, embeds)
    out = model(
        inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        use_cache=False,
    )
    return out.logits


class LlavaPhase(L.LightningModule):
    """Answer loss on every branch, plus dense targets through the LLM: at each image token the LM head
    must name the patch's colour, shape ("nothing" for background), grid cell and colour count, as words."""

    def __init__(self, model, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.model.model.vision_tower.requires_grad_(False)
        tok = build_tokenizer()
        for name, words in (
            ("colour_words", [NOTHING, *COLOURS]), ("shape_words", [NOTHING, *SHAPES]), ("cell_words", POSITIONS),
            ("count_words", NUMBERS),
        ):
            self.register_buffer(name, torch.tensor(tok.convert_tokens_to_ids(words)), persistent=False)
        self.register_buffer("cells", patch_cells(), persistent=False)

    def dense_loss(self, logits: Tensor, batch: dict) -> Tensor:
        """Cross-entropy of the patch labels read off the LM head at the image tokens."""
        index = batch["image_index"]
        shown = index >= 0
        patch = index.clamp(min=0)
        at_images = logits[shown]  # [N, vocab]
        colour = batch["patch_colour"].gather(1, patch)[shown]
        shape = batch["patch_shape"].gather(1, patch)[shown]
        return (
            F.cross_entropy(at_images[:, self.colour_words], colour)
            + F.cross_entropy(at_images[:, self.shape_words], shape)
            + F.cross_entropy(at_images[:, self.cell_words], self.cells[patch[shown]])
            + F.cross_entropy(at_images[:, self.count_words], batch["colour_count"].gather(1, patch)[shown])
        )

    def training_step(self, batch: dict, step: int) -> Tensor:
        logits = llava_logits(self.model, batch)
        flat = logits.flatten(0, 1)  # [B * L, vocab]
        answer_loss = F.cross_entropy(flat, batch["labels"].flatten(), ignore_index=-100)
        dense = self.dense_loss(logits, batch)
        loss = answer_loss + self.cfg.dense_weight * dense
        logs = {"answer_loss": answer_loss, "dense": dense}
        for name, weight in (("question", self.cfg.question_weight), ("caption", self.cfg.caption_weight)):
            targets = batch[f"{name}_labels"].flatten()
            if weight > 0 and bool((targets >= 0).any()):
                logs[name] = F.cross_entropy(flat, targets, ignore_index=-100)
                loss = loss + weight * logs[name]
        answers = batch["labels"] >= 0
        logs["token_acc"] = (logits.argmax(-1)[answers] == batch["labels"][answers]).float().mean()
        self.log_dict(logs, prog_bar=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg.llava_lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _schedule(s, self.cfg.llava_steps, self.cfg.warmup)
        )
        return [opt], [{"scheduler": sched, "interval": "step"}]


def _fit(module: L.LightningModule, batches: IterableDataset, steps: int) -> None:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, gradient_clip_val=1.0,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))


def llava_batches(cfg: TrainConfig, tokenizer) -> SceneBatches:
    """The LLaVA phase's batch stream (seed ``cfg.seed + 1``; a caption branch when ``caption_weight > 0``)."""
    return SceneBatches(
        cfg.llava_batch, cfg.seed + 1, cfg.questions_per_image,
        lambda s, rng: llava_batch(s, rng, cfg.drop_probability, tokenizer, captions=cfg.caption_weight > 0),
    )


def train(cfg: TrainConfig, model_cfg: ShapesModelConfig | None = None, clip: CLIPModel | None = None):
    """Both phases from ``cfg.seed``; returns (clip, llava).

    ``clip``: a CLIP pair already trained by phase 1, to run phase 2 alone. Phase 2 is re-seeded
    (``cfg.seed + 1``) before its LLaVA is built, so on the CLIP that phase 1 of the same seed writes
    (phase 1 is deterministic) it gives the full recipe's weights.
    """
    model_cfg = model_cfg or ShapesModelConfig()
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, verbose=False)
    tok = build_tokenizer()
    if clip is None:
        clip = build_clip(model_cfg)
        _fit(
            ClipPhase(clip, cfg),
            SceneBatches(cfg.clip_batch, cfg.seed, 1, lambda s, rng: clip_batch(s, rng, tok)),
            cfg.clip_steps,
        )
    L.seed_everything(cfg.seed + 1, verbose=False)  # phase 2 starts from the same state with or without phase 1
    llava = build_llava(model_cfg, clip)
    _fit(LlavaPhase(llava, cfg), llava_batches(cfg, tok), cfg.llava_steps)
    return clip.eval(), llava.eval()
