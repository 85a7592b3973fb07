"""Training recipe of the offline default, in two Lightning phases (LLaVA's: align the vision side, then tune).

Phase 1, the CLIP pair. The vision tower (ViT with a CLS token) and a small text encoder learn, on
scenes from the generator: per-patch colour, shape and grid cell (dense auxiliary labels), patch embedding
<-> text embedding of the patch's concept ("red circle"; "nothing" for background) by a CLIP
softmax over concepts, question embedding -> its relevant patches (softmax over patches), and CLS
embedding -> the concepts present. This is what ATP's CLS attention and CLIP similarity read.

Phase 2, the LLaVA. The vision tower is frozen (as in LLaVA-1.5); the MLP projector and a Llama LLM
are trained from scratch on answer tokens only, with several question-answer turns per image in one
sequence (as LLaVA's instruction data). In a share of the sequences the image tokens that are not
object patches some question depends on are dropped at a random rate (kept tokens keep their
original positions), so answers depend on which tokens are present, not on how many: a model that
saw only complete images counts by the share of image tokens of a colour, which pruning changes.
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

from research.data.shapes import COLOURS, NUM_PATCHES, SHAPES, training_scene
from research.shapes_model.modeling import (
    DenseHeads,
    ShapesModelConfig,
    build_clip,
    build_llava,
    patch_cells,
    pixel_values,
)
from research.shapes_model.vocab import EOS, build_tokenizer

CONCEPTS = [f"{c} {s}" for c in COLOURS for s in SHAPES] + ["nothing"]  # index 24 = background


@dataclass
class TrainConfig:
    """Recipe of the shipped model (``python -m research.train_offline_model`` reproduces it)."""

    seed: int = 0
    clip_steps: int = 800
    clip_batch: int = 64
    clip_lr: float = 2e-3
    llava_steps: int = 2200
    llava_batch: int = 32
    llava_lr: float = 1e-3
    questions_per_image: int = 4
    drop_probability: float = 0.5  # share of sequences whose irrelevant image tokens are randomly dropped
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


# ---- phase 1: the CLIP pair --------------------------------------------------------------------
def clip_batch(scenes: list, rng: np.random.Generator, tokenizer=None) -> dict:
    tokenizer = tokenizer or build_tokenizer()
    bos, eos = tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(EOS)
    images = torch.from_numpy(np.stack([s.image for s, _ in scenes]))
    colour = torch.from_numpy(np.stack([s.patch_colour.reshape(-1) for s, _ in scenes])).long()  # [B, P]
    shape = torch.from_numpy(np.stack([s.patch_shape.reshape(-1) for s, _ in scenes])).long()
    background = len(CONCEPTS) - 1
    concept = torch.where(colour > 0, (colour - 1) * len(SHAPES) + (shape - 1).clamp(min=0), background)
    present = torch.zeros(len(scenes), len(CONCEPTS))
    for i, (scene, _) in enumerate(scenes):
        for obj in scene.objects:
            present[i, COLOURS.index(obj.colour) * len(SHAPES) + SHAPES.index(obj.shape)] = 1
    questions = [qs[int(rng.integers(len(qs)))] for _, qs in scenes]
    return {
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
        colour_logits, shape_logits, cell_logits = self.heads(patches)
        cells = self.cells.expand(patches.shape[0], -1)
        dense = (
            F.cross_entropy(colour_logits.flatten(0, 1), batch["colour"].flatten())
            + F.cross_entropy(shape_logits.flatten(0, 1), batch["shape"].flatten())
            + F.cross_entropy(cell_logits.flatten(0, 1), cells.flatten())
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
def llava_batch(scenes: list, rng: np.random.Generator, drop_probability: float, tokenizer=None) -> dict:
    """Multi-turn sequences ``<s> USER: <image>*n q1 ASSISTANT: a1 </s> USER: q2 ...`` (right padded).

    ``image_index`` [B, L] holds the patch each image slot shows (-1 for text); dropped patches are
    simply absent, and ``position_ids`` keep every token's position in the complete sequence.
    """
    tok = tokenizer or build_tokenizer()
    user, assistant = tok.convert_tokens_to_ids(["USER:", "ASSISTANT:"])
    eos = tok.convert_tokens_to_ids(EOS)
    rows, labels, image_index, positions = [], [], [], []
    for scene, questions in scenes:
        kept = np.arange(NUM_PATCHES)
        if rng.random() < drop_probability:
            # every object patch an answer depends on stays; everything else is kept at a random rate
            needed = np.any([q.relevant.reshape(-1) for q in questions], axis=0) & scene.objects_mask.reshape(-1)
            others = np.flatnonzero(~needed)
            extra = rng.random(len(others)) < rng.random()
            kept = np.sort(np.concatenate([np.flatnonzero(needed), others[extra]]))
        ids = [tok.bos_token_id, user] + [tok.pad_token_id] * len(kept)
        pos = [0, 1] + [2 + int(p) for p in kept]
        target = [-100] * len(ids)
        patch = [-1, -1] + [int(p) for p in kept]
        next_pos = 2 + NUM_PATCHES
        for turn, q in enumerate(questions):
            words = ([user] if turn else []) + _words(tok, q.text) + [assistant]
            answer = [*_words(tok, q.answer), eos]
            ids += words + answer
            target += [-100] * len(words) + answer
            patch += [-1] * (len(words) + len(answer))
            pos += list(range(next_pos, next_pos + len(words) + len(answer)))
            next_pos += len(words) + len(answer)
        rows.append(ids), labels.append(target[1:] + [-100]), image_index.append(patch), positions.append(pos)
    # labels[t] is the token at t+1: the model predicts it from position t (we shift here, not HF)
    images = torch.from_numpy(np.stack([s.image for s, _ in scenes]))
    width = max(len(r) for r in rows)
    return {
        "pixel_values": pixel_values(images),
        "input_ids": _pad(rows, tok.pad_token_id),
        "labels": _pad(labels, -100),
        "image_index": _pad(image_index, -1),
        "position_ids": _pad(positions, 0),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
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
    def __init__(self, model, cfg: TrainConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.model.model.vision_tower.requires_grad_(False)

    def training_step(self, batch: dict, step: int) -> Tensor:
        logits = llava_logits(self.model, batch)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        answers = batch["labels"] >= 0
        accuracy = (logits.argmax(-1)[answers] == batch["labels"][answers]).float().mean()
        self.log_dict({"loss": loss, "token_acc": accuracy}, prog_bar=True)
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


def train(cfg: TrainConfig, model_cfg: ShapesModelConfig | None = None):
    """Both phases from ``cfg.seed``; returns (clip, llava)."""
    model_cfg = model_cfg or ShapesModelConfig()
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, verbose=False)
    tok = build_tokenizer()
    clip = build_clip(model_cfg)
    _fit(
        ClipPhase(clip, cfg),
        SceneBatches(cfg.clip_batch, cfg.seed, 1, lambda s, rng: clip_batch(s, rng, tok)),
        cfg.clip_steps,
    )
    llava = build_llava(model_cfg, clip)
    _fit(
        LlavaPhase(llava, cfg),
        SceneBatches(
            cfg.llava_batch, cfg.seed + 1, cfg.questions_per_image,
            lambda s, rng: llava_batch(s, rng, cfg.drop_probability, tok),
        ),
        cfg.llava_steps,
    )
    return clip.eval(), llava.eval()
