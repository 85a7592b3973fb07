"""Accuracy of a LLaVA on ``shapes`` samples, optionally with a fixed set of image tokens kept.

Inputs go through the model's processor and chat format (``LlavaAdapter.build_inputs``), and the
answer is the greedy next token after ``ASSISTANT:``, as ``generate`` would produce it. Oracle and
random keep sets are applied with the pruning engine at the vision-language interface (replay).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch

from research.data.shapes import ANSWER_CHOICES, QTYPES, Sample, ShapesVQA, accuracy
from research.models import LlavaAdapter
from research.pruning import PruningEngine, PruningPlan

KeepFn = Callable[[Sample, int], np.ndarray]  # (sample, index) -> sorted patch indices to keep


@torch.no_grad()
def predict(
    adapter: LlavaAdapter, processor, samples: Sequence[Sample], keep: KeepFn | None = None, batch_size: int = 100
) -> list[str]:
    """Greedy one-word answers for ``samples``; ``keep`` restricts the image tokens the LLM sees."""
    model, predictions = adapter.model, []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        inputs = adapter.build_inputs(processor, [ShapesVQA.pil_image(s) for s in chunk], [s.question for s in chunk])
        if keep is None:
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        else:
            kept = np.stack([keep(s, start + i) for i, s in enumerate(chunk)])  # [B, k] patch indices
            first_image = (inputs["input_ids"] == adapter.image_token_id).int().argmax(1, keepdim=True)
            replay = [torch.from_numpy(kept).to(first_image.device) + first_image]
            with PruningEngine(model, None, PruningPlan.of([-1], [kept.shape[1]]), replay=replay, adapter=adapter):
                logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        predictions += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return predictions


def report(samples: Sequence[Sample], predictions: Sequence[str]) -> dict[str, float]:
    """Overall and per-question-type accuracy."""
    by_type: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_type[s.qtype].append(i)
    result = {"overall": accuracy(predictions, [s.answer for s in samples])}
    for qtype in QTYPES:
        idx = by_type[qtype]
        result[qtype] = accuracy([predictions[i] for i in idx], [samples[i].answer for i in idx])
    return result


def baselines(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Chance (uniform over a type's answers) and majority-class (per type) accuracy."""
    chance, majority = {}, {}
    for qtype in QTYPES:
        answers = [s.answer for s in samples if s.qtype == qtype]
        chance[qtype] = 1.0 / len(ANSWER_CHOICES[qtype])
        majority[qtype] = max(answers.count(a) for a in set(answers)) / len(answers)
    counts = {q: sum(s.qtype == q for s in samples) for q in QTYPES}
    for table in (chance, majority):
        table["overall"] = sum(table[q] * counts[q] for q in QTYPES) / len(samples)
    return {"chance": chance, "majority": majority}
