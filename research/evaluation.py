"""Lightning predict loop for one combination, its prediction writer and its TensorBoard report."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from research.combination import Combination
from research.data.benchmark import Scoring, cut_at_stop
from research.data.images import decodable, sample_image
from research.pruning import PruningEngine
from research.pruning.timing import Timer
from research.report.figures import TOKENS_PER_LAYER, layer_curves, token_overlay
from research.report.flops import flops_for_model
from research.report.runs import log_hparams, run_name
from research.storage import write_atomic


class CombinationModule(L.LightningModule):
    """Answers batches of samples (greedy generation) with the engine set up for one combination."""

    def __init__(
        self, adapter: Any, processor: Any, combo: Combination, max_new_tokens: int, num_vision: int,
        until: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.adapter, self.processor, self.combo, self.num_vision = adapter, processor, combo, num_vision
        if getattr(adapter.model, "hf_device_map", None):  # sharded by accelerate: not Lightning's to move
            self.__dict__["model"] = adapter.model
        else:
            self.model = adapter.model
        self.plan = None if combo.is_vanilla else combo.plan()
        self.scorer = None if combo.is_vanilla else combo.make_scorer()
        # a scorer that sets each row's counts or merges tokens (research.pruning.engine): report what ran
        self.sets_own_counts = hasattr(self.scorer, "keep_counts") or hasattr(self.scorer, "merge_groups")
        # until: the task's stop strings (lmms-eval's); answers are cut where the family's lmms-eval wrapper cuts
        self.max_new_tokens, self.until = max_new_tokens, adapter.stop_strings(until)
        self.rows: list[dict] = []
        self.skipped: list[str] = []  # ids of samples whose image could not be decoded
        self.metrics: dict[str, Any] = {}
        self.error: Exception | None = None  # the first error of a batch: later batches are skipped
        self.error_message: str | None = None
        self.eval_seconds = 0.0  # the predict loop's wall time (set by research.distributed.RankZeroReport)
        # Attention dynamics of this combination, filled by research.analysis.per_combination's report (run before
        # TensorBoardReport when eval.analysis_samples > 0): headline scalars (HParams) and the rest (result file).
        self.dynamics_metrics: dict[str, float] = {}
        self.dynamics: dict[str, Any] = {}

    def engine(self) -> contextlib.AbstractContextManager:
        if self.plan is None:
            return contextlib.nullcontext()
        return PruningEngine(self.model, self.scorer, self.plan, adapter=self.adapter)

    def inputs(self, samples: Sequence[Any]) -> dict:
        images = [sample_image(s) for s in samples]
        return self.adapter.build_inputs(self.processor, images, [s.question for s in samples])

    def predict_step(self, batch: list[tuple[int, Any]], batch_idx: int) -> list[dict]:
        """Answers a batch of (index, sample); an error is kept (and raised after the loop, on every rank)."""
        if self.error is not None:
            return []
        try:
            return self._answer(batch)
        except Exception as error:  # its traceback stays on the exception, logged where the combination fails
            self.error, self.error_message = error, f"{type(error).__name__}: {error}".splitlines()[0]
            return []

    def _answer(self, batch: list[tuple[int, Any]]) -> list[dict]:
        index_of = {id(s): i for i, s in batch}
        samples, images = decodable([s for _, s in batch], self.skipped)
        if not samples:
            return []
        inputs = self.adapter.build_inputs(self.processor, images, [s.question for s in samples])
        prompt = inputs["input_ids"].shape[1]
        with torch.no_grad(), self.engine() as engine:
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = self.processor.batch_decode(out[:, prompt:], skip_special_tokens=True)
        kept = engine.last.tokens_per_layer if engine is not None else None
        rows = [
            {
                "index": index_of[id(s)], "id": s.id, "qtype": getattr(s, "qtype", None), "question": s.question,
                "answer": s.answer, "prediction": cut_at_stop(a, self.until), "tokens_per_layer": kept,
                **({"target": s.target} if getattr(s, "target", None) is not None else {}),
            }
            for s, a in zip(samples, answers)
        ]
        self.rows += rows
        return rows


class JsonlPredictionWriter(Callback):
    """Per-sample predictions as JSONL, in sample order, once the loop has finished (``module.rows`` holds every
    rank's): index, id, question, answer, prediction, correct, kept-token counts (and, for a benchmark with
    targets, the target and the sample's ``score``, e.g. its VQA accuracy). Written atomically, so the old file
    is replaced only by a finished combination's."""

    def __init__(self, path: Path, scoring: Scoring) -> None:
        super().__init__()
        self.path, self.scoring = path, scoring

    def on_predict_end(self, trainer: L.Trainer, module: CombinationModule) -> None:
        lines = []
        for row in module.rows:
            score = self.scoring.sample_score(row)
            lines.append(json.dumps({**row, "correct": score == 1.0, **({"score": score} if "target" in row else {})}))
        write_atomic(self.path, "".join(line + "\n" for line in lines))


@torch.no_grad()
def measure_latency(module: CombinationModule, samples: Sequence[Any], decode_tokens: int, warmup: int = 2) -> dict:
    """Batch-1 prefill latency (median, p90), decode time per token, scoring time and peak memory."""
    device = module.model.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode, scoring = [], [], []
    for timed, sample in [(False, s) for s in samples[:warmup]] + [(True, s) for s in samples]:
        inputs = module.inputs([sample])
        clock, total = Timer(), Timer()
        with module.engine() as engine, clock.span(device):
            module.model(**inputs, logits_to_keep=1)
        with module.engine(), total.span(device):
            module.model.generate(
                **inputs, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False
            )
        if timed:
            prefill.append(clock.seconds)
            decode.append(max(0.0, total.seconds - clock.seconds) / max(1, decode_tokens - 1))
            scoring.append(engine.last.scoring_seconds if engine is not None else 0.0)
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (CPU), MB
    )
    return {
        "prefill_ms": 1000 * statistics.median(prefill),
        "prefill_p90_ms": 1000 * float(np.percentile(prefill, 90)),
        "decode_ms_per_token": 1000 * statistics.median(decode),
        "scoring_ms": 1000 * statistics.median(scoring),
        "peak_memory_mb": peak,
    }


@torch.no_grad()
def kept_patches(module: CombinationModule, samples: Sequence[Any]) -> list[list[np.ndarray]]:
    """Per sample, per stage: the image-token indices (patch order) kept after that stage."""
    if module.plan is None or not samples:  # eval.overlays=0: no forward at all
        return [[] for _ in samples]
    inputs = module.inputs(samples)
    with module.engine() as engine:
        module.model(**inputs, logits_to_keep=1)
    first = (inputs["input_ids"] == module.adapter.image_token_id).int().argmax(1, keepdim=True)
    stages = [(kept - first).masked_fill(kept < 0, -1).cpu().numpy() for kept in engine.last.kept]
    # -1 pads rows that keep fewer tokens than the batch's most (sparsevlm's rank-adaptive counts)
    return [[stage[i][stage[i] >= 0] for stage in stages] for i in range(len(samples))]


def overlay_caption(sample: Any, prediction: str | None) -> str:
    """``Q: <question> | A: <answer> | prediction: <prediction>`` (``-`` when the sample was not predicted)."""
    return f"Q: {sample.question} | A: {sample.answer} | prediction: {prediction if prediction is not None else '-'}"


class TensorBoardReport(Callback):
    """After the predict loop: accuracy, latency, FLOPs, tokens, hparams and overlay images to TensorBoard."""

    def __init__(self, scoring: Scoring, vanilla_accuracy: float | None, latency_samples, overlay_samples,
                 decode_tokens, vanilla_flops: float | None = None):
        super().__init__()
        self.scoring, self.vanilla_accuracy, self.vanilla_flops = scoring, vanilla_accuracy, vanilla_flops
        self.latency_samples, self.overlay_samples, self.decode_tokens = latency_samples, overlay_samples, decode_tokens

    def on_predict_end(self, trainer: L.Trainer, module: CombinationModule) -> None:
        combo, rows = module.combo, module.rows
        if not rows:
            return  # nothing evaluated (every image undecodable): the combination fails, no metrics
        latency_samples = decodable(self.latency_samples, [])[0]  # a sample whose image fails is skipped there too
        overlay_samples = decodable(self.overlay_samples, [])[0]
        scores = self.scoring.score(rows)
        accuracy = scores[self.scoring.headline]  # the dataset's headline metric (shapes: accuracy)
        by_type: dict[str, float] = {}  # mean per-sample score by question type / category
        for qtype in sorted({r["qtype"] for r in rows if r["qtype"]}):
            subset = [self.scoring.sample_score(r) for r in rows if r["qtype"] == qtype]
            by_type[qtype] = sum(subset) / len(subset)
        num_vision = module.num_vision
        tokens_per_layer = (
            [num_vision] * module.adapter.num_layers if combo.is_vanilla
            else module.plan.tokens_per_layer(module.adapter.num_layers, num_vision)
        )
        reported_avg, computed_avg = combo.reported_avg, combo.computed_avg
        ran = [r["tokens_per_layer"] for r in rows if r.get("tokens_per_layer")]
        if module.sets_own_counts and ran:  # the scorer set its counts or merged: what ran, not the plan
            tokens_per_layer = [float(np.mean(layer)) for layer in zip(*ran)]  # per row: its batch's mean
            computed_avg = float(np.mean(tokens_per_layer))
            reported_avg = float(np.mean(tokens_per_layer[1:] + tokens_per_layer[-1:]))  # post: one layer earlier
        prompt = module.inputs(latency_samples[:1])["input_ids"].shape[1]
        flops = flops_for_model(module.adapter, tokens_per_layer, prompt - num_vision, combo.locations)
        metrics = {
            "accuracy": accuracy,
            "accuracy_ratio": accuracy / self.vanilla_accuracy if self.vanilla_accuracy else 1.0,
            **measure_latency(module, latency_samples, self.decode_tokens),
            "gflops": flops.total_prefill / 1e9,
            "flops_ratio": flops.total_prefill / self.vanilla_flops if self.vanilla_flops else 1.0,
            "avg_tokens": reported_avg,
            "computed_avg_tokens": computed_avg,
            "skipped_images": len(module.skipped),
            "eval_seconds": module.eval_seconds,
            **module.dynamics_metrics,  # research.analysis.per_combination, when it ran
        }
        metrics.update({name: value for name, value in scores.items() if name not in metrics})  # benchmark metrics
        module.metrics = {**metrics, **module.dynamics, "accuracy_by_type": by_type,
                          "tokens_per_layer": tokens_per_layer,
                          "flops": flops.total_prefill, "decode_flops_per_token": flops.decode_per_token}
        writer = trainer.logger.experiment
        for qtype, value in by_type.items():
            writer.add_scalar(f"accuracy_by_type/{qtype}", value, 0)
        # A per-layer curve is a figure, not scalar steps (TensorBoard would smooth them into wrong values).
        writer.add_figure("tokens_per_layer", layer_curves({run_name(combo): tokens_per_layer}, TOKENS_PER_LAYER), 0)
        # Each metric is written once, as the scalar ``metrics/<name>``: Lightning's ``log_hyperparams`` writes the
        # metric dict as scalars itself and the HParams dashboard reads those same tags.
        log_hparams(trainer.logger, combo, num_vision, {**metrics, "failed": 0})
        predictions = {r["id"]: r["prediction"] for r in rows}
        grid = module.adapter.token_grid(num_vision)
        if grid is None and overlay_samples:
            logging.getLogger(__name__).info(
                "no kept-token overlays: %s's image tokens do not form one square patch grid",
                     module.adapter.family)
            overlay_samples = []
        for sample, stages in zip(overlay_samples, kept_patches(module, overlay_samples) if overlay_samples else []):
            if not stages:
                continue
            titles = [f"{f'after layer {loc}' if loc >= 0 else 'before LLM'}: {len(kept)} kept"
                      for loc, kept in zip(combo.locations, stages)]
            figure = token_overlay(np.asarray(sample_image(sample)), grid, stages, titles,
                                   overlay_caption(sample, predictions.get(sample.id)))
            writer.add_figure(f"kept_tokens/{sample.id}", figure, 0)
        writer.flush()
