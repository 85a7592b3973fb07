"""Attention dynamics of one combination, measured on the model as that combination prunes it.

On the first ``eval.analysis_samples`` samples, one prefill per batch runs with the combination's own engine (its
scorer and plan; nothing for vanilla) in observer mode: at every decoder layer the observers read that layer's
signals, over the tokens the layer ran on, before any pruning there. Three observers:

* text dynamics (AdaptInfer Figure 2, :class:`~research.analysis.dynamics.TextDynamics`): the mIoU of the top-20%
  question tokens between layers; headline: the mean IoU of consecutive layers (``adjacent_miou``). Question
  tokens are never pruned, so the figure is defined on every combination alike.
* attention shifts (Figure 3, :class:`~research.analysis.shifts.AttentionShifts`): per sample, the top-10%
  vision tokens by attention received from the question over all layers, and where each one's cumulative
  attention curve changes regime. **A pruned token contributes nothing after it is gone**: from the first layer
  without it its attention is 0, so its cumulative curve is flat from there (pruning itself can be the shift it
  shows); it stays a candidate key token by the attention it received before. Headline: the shift layers the
  ``changepoint`` schedule's rule reads from the histogram (``shift_layers``).
* relevant-patch recall (datasets whose samples carry a ``relevant`` patch mask, e.g. ``shapes``): per layer, the
  share of a sample's relevant patches among the vision tokens that layer runs on, averaged over samples; the value
  at the layer after a stage is the recall after that stage. Headline: the last layer's (after every stage).

The observer's wall time (``analysis_seconds``, prefills included) is reported next to the predict loop's
(``eval_seconds``) as ``analysis_share``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from research.analysis.dynamics import TextDynamics
from research.analysis.shifts import AttentionShifts
from research.pruning import PruningEngine, PruningPlan
from research.pruning.signals import Signals


class RelevantRecall:
    """Observer: per layer, the mean over samples of the share of each sample's relevant patches that the layer
    still runs on. Call :meth:`begin` with the batch's masks before each forward."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.sums = np.zeros(num_layers)
        self.samples = 0
        self.relevant: Tensor | None = None  # [B, V] bool of the current batch

    def begin(self, relevant: Tensor) -> None:
        self.relevant = relevant

    def __call__(self, signals: Signals) -> None:
        if self.relevant is None:
            return
        ranks = signals.layout.vision_rank  # [B, V_l] patch index of each token the layer ran on
        relevant = self.relevant.to(ranks.device)
        kept = relevant.gather(1, ranks)  # [B, V_l]
        valid = getattr(signals.layout, "vision_valid", None)  # rows with fewer image tokens than the batch's largest
        kept = (kept if valid is None else kept & valid).sum(1)  # [B]
        self.sums[signals.layer_idx] += (kept / relevant.sum(1)).sum().item()
        if signals.layer_idx == self.num_layers - 1:
            self.samples += relevant.shape[0]

    def per_layer(self) -> list[float] | None:
        return (self.sums / self.samples).tolist() if self.samples else None


def relevant_masks(samples: Sequence[Any], num_vision: int) -> Tensor | None:
    """[B, V] bool relevant-patch masks of ``samples`` (patch order), or None if a sample has none (or an empty
    one) or its mask does not have one entry per vision token."""
    masks = [getattr(s, "relevant", None) for s in samples]
    if any(m is None for m in masks):
        return None
    flat = [np.asarray(m, dtype=bool).reshape(-1) for m in masks]
    if any(len(m) != num_vision or not m.any() for m in flat):
        return None
    return torch.from_numpy(np.stack(flat))


@torch.no_grad()
def observe_combination(module: Any, samples: Sequence[Any], batch_size: int) -> dict[str, Any]:
    """Run the three observers over ``samples`` on the combination of ``module`` (a ``CombinationModule``); returns the
    figures' data, their headline values and the wall time."""
    from schedules.changepoint import changepoint_layers

    start = time.perf_counter()
    num_layers = module.adapter.num_layers
    text = TextDynamics(num_layers)
    shifts = AttentionShifts(num_layers)
    recall = RelevantRecall(num_layers)
    with_recall = relevant_masks(samples, module.num_vision) is not None

    def observe(signals: Signals) -> None:
        text(signals)
        shifts(signals)
        recall(signals)

    plan = module.plan if module.plan is not None else PruningPlan.of([], [])
    for begin in range(0, len(samples), batch_size):
        batch = samples[begin:begin + batch_size]
        if with_recall:
            recall.begin(relevant_masks(batch, module.num_vision))
        inputs = module.inputs(batch)
        with PruningEngine(module.model, module.scorer, plan, adapter=module.adapter, observe=observe):
            module.model(**inputs, logits_to_keep=1)
    try:
        layers = changepoint_layers(shifts.histogram)
    except ValueError:  # no counts
        layers = []
    per_layer = recall.per_layer()
    locations = module.combo.locations
    return {
        "analysis_samples": text.samples,
        "text_miou": text.matrix().tolist(),
        "adjacent_miou": text.adjacent_mean(),
        "shift_histogram": shifts.histogram.tolist(),
        "shift_layers": layers,
        "relevant_recall_per_layer": per_layer,
        "relevant_recall_per_stage": None if per_layer is None else [
            per_layer[loc + 1] if loc + 1 < num_layers else math.nan for loc in locations
        ],
        "relevant_recall": None if per_layer is None else per_layer[-1],
        "analysis_seconds": time.perf_counter() - start,
    }


def log_dynamics(writer: Any, result: dict[str, Any], label: str) -> None:
    """The figures of :func:`observe_combination` in a combination's TensorBoard run: ``dynamics/text_miou``
    (heatmap), ``dynamics/shift_histogram`` (one bar per layer), ``dynamics/shift_layers`` (text) and
    ``dynamics/relevant_recall`` (a curve over the layers, named ``label``); their headline values are the run's
    ``metrics/`` scalars."""
    from research.report.figures import RELEVANT_RECALL, heatmap, histogram_bars, layer_curves

    n = result["analysis_samples"]
    matrix = np.asarray(result["text_miou"])
    labels = [str(i) for i in range(len(matrix))]
    # Short titles: TensorBoard names the run (the combination) on each image; a long label would be cut off.
    writer.add_figure("dynamics/text_miou", heatmap(
        matrix, labels, f"question-token mIoU, adjacent {result['adjacent_miou']:.3f}, N={n}"), 0)
    writer.add_figure("dynamics/shift_histogram", histogram_bars(
        np.asarray(result["shift_histogram"]), f"attention shifts -> layers {result['shift_layers']} (N={n})",
        "layer"), 0)
    writer.add_text("dynamics/shift_layers", str(result["shift_layers"]), 0)
    if result["relevant_recall_per_layer"]:  # a figure: scalar steps would be smoothed into wrong values
        writer.add_figure("dynamics/relevant_recall", layer_curves(
            {label: result["relevant_recall_per_layer"]}, RELEVANT_RECALL, n), 0)


class AttentionDynamicsReport(Callback):
    """After the predict loop (rank 0): observes the combination on ``samples``, logs the figures and leaves the
    headline values in ``module.dynamics_metrics`` (scalars for the HParams entry) and the rest in
    ``module.dynamics`` (for the result file)."""

    def __init__(self, samples: Sequence[Any], batch_size: int) -> None:
        super().__init__()
        self.samples, self.batch_size = samples, batch_size

    def on_predict_end(self, trainer: Any, module: Any) -> None:
        from research.data.images import decodable
        from research.report.runs import run_name

        samples = decodable(self.samples, [])[0]
        if not samples or not module.rows:
            return
        result = observe_combination(module, samples, self.batch_size)
        log_dynamics(trainer.logger.experiment, result, run_name(module.combo))
        headline = {"adjacent_miou": result["adjacent_miou"], "analysis_seconds": result["analysis_seconds"],
                    "analysis_share": result["analysis_seconds"] / max(module.eval_seconds, 1e-9)}
        if result["relevant_recall"] is not None:
            headline["relevant_recall"] = result["relevant_recall"]
        module.dynamics_metrics = headline
        module.dynamics = {k: v for k, v in result.items() if k not in headline}
