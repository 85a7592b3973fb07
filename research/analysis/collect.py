"""Run the observers over a dataset in a Lightning predict loop; write CSVs, figures and the shift cache."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from research.analysis.dynamics import TextDynamics
from research.analysis.shifts import AttentionShifts
from research.pruning import PruningEngine, PruningPlan


class ObserverModule(L.LightningModule):
    """predict_step: one prefill per batch with the engine in observer mode (nothing is pruned)."""

    def __init__(self, adapter: Any, processor: Any, observe: Callable) -> None:
        super().__init__()
        self.adapter, self.processor, self.observe = adapter, processor, observe
        self.model = adapter.model

    def predict_step(self, batch: list, batch_idx: int) -> list:
        from research.data.images import sample_image

        images, questions = [sample_image(s) for s in batch], [s.question for s in batch]
        inputs = self.adapter.build_inputs(self.processor, images, questions)
        with torch.no_grad(), PruningEngine(self.model, None, PruningPlan.of([], []), adapter=self.adapter,
                                            observe=self.observe):
            self.model(**inputs, logits_to_keep=1)
        return []  # nothing to predict: the observers hold the result (None would make Lightning warn)


def observe_dataset(adapter: Any, processor: Any, samples: Sequence[Any], observers: list[Callable],
                    batch_size: int, logger: TensorBoardLogger | bool = False, label: str = "observing") -> None:
    """One observed prefill per batch of ``samples`` in a Lightning predict loop, its progress bar labelled."""
    from research.progress import labelled_progress_bar

    def observe(signals: Any) -> None:
        for observer in observers:
            observer(signals)

    bar = labelled_progress_bar(f"{label} ({len(samples)} samples)")
    trainer = L.Trainer(accelerator="auto", devices=1, logger=logger, enable_checkpointing=False,
                        enable_model_summary=False, callbacks=[bar])
    trainer.predict(ObserverModule(adapter, processor, observe), DataLoader(list(samples), batch_size=batch_size,
                                                                           collate_fn=list), return_predictions=False)


def attention_shift_histogram(adapter: Any, processor: Any, samples: Sequence[Any], batch_size: int,
                              logger: TensorBoardLogger | bool = False) -> np.ndarray:
    shifts = AttentionShifts(adapter.num_layers)
    observe_dataset(adapter, processor, samples, [shifts], batch_size, logger, "calibration: attention shifts")
    return shifts.histogram


def log_shift_histogram(writer: Any, histogram: np.ndarray, layers: list[int] | None, tag: str,
                        source: str = "") -> None:
    """``<tag>/shift_histogram`` (one bar per layer) and, with ``layers``, the text ``<tag>/changepoint_layers``:
    ``<source> -> prune after layers [3, 4]`` (``source`` says what was observed, on which split, how many
    samples)."""
    from research.report.figures import histogram_bars

    # One bar per layer (TensorBoard's own histograms would rebin these integer counts).
    title = "attention-shift layers" + (f" -> prune after {layers}" if layers is not None else "")
    if source:  # what, on which split, how many samples: on the figure too (two lines at card width)
        title = source.replace(": ", ":\n", 1) + (f" -> prune after {layers}" if layers is not None else "")
    writer.add_figure(f"{tag}/shift_histogram", histogram_bars(np.asarray(histogram), title, "layer"), 0)
    if layers is not None:
        writer.add_text(f"{tag}/changepoint_layers", f"{source} -> prune after layers {layers}" if source
                        else str(layers), 0)
    writer.flush()


def run_analysis(name: str, adapter: Any, processor: Any, samples: Sequence[Any], out: Path, batch_size: int) -> dict:
    """Figure 2 (text_dynamics) or Figure 3 (attention_shifts) on ``samples``: CSV + TensorBoard."""
    from research.report.figures import heatmap
    from schedules.changepoint import changepoint_layers

    out.mkdir(parents=True, exist_ok=True)
    logger = TensorBoardLogger(save_dir=out, name="tensorboard", version=name, default_hp_metric=False)
    writer = logger.experiment
    num_layers = adapter.num_layers
    if name == "text_dynamics":
        dynamics = TextDynamics(num_layers)
        observe_dataset(adapter, processor, samples, [dynamics], batch_size, logger, "text dynamics")
        matrix = dynamics.matrix()
        np.savetxt(out / "text_dynamics.csv", matrix, delimiter=",", fmt="%.4f",
                   header=",".join(f"layer{i}" for i in range(num_layers)))
        labels = [str(i) for i in range(num_layers)]
        writer.add_figure("text_dynamics/miou", heatmap(matrix, labels, "mIoU of the top-20% question tokens"), 0)
        writer.add_scalar("text_dynamics/off_diagonal_miou", dynamics.off_diagonal_mean(), 0)
        writer.flush()
        return {"samples": dynamics.samples, "off_diagonal_miou": dynamics.off_diagonal_mean(),
                "matrix": matrix.tolist()}
    shifts = AttentionShifts(num_layers)
    observe_dataset(adapter, processor, samples, [shifts], batch_size, logger, "attention shifts")
    layers = changepoint_layers(shifts.histogram)
    with (out / "attention_shifts.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("layer", "shifts"), *enumerate(shifts.histogram.tolist())])
    log_shift_histogram(writer, shifts.histogram, layers, "attention_shifts")
    result = {"samples": shifts.samples, "histogram": shifts.histogram.tolist(), "changepoint_layers": layers}
    (out / "attention_shifts.json").write_text(json.dumps(result, indent=2))
    return result
