"""Lightning's progress bar with a combination's label in place of "Predicting" (sweeps, calibration, analyses)."""

from __future__ import annotations

import importlib.util

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


def labelled_progress_bar(label: str) -> ProgressBar:
    """Lightning's progress bar (Rich when installed, else tqdm) with ``label`` in place of "Predicting"."""
    if importlib.util.find_spec("rich") is not None:
        from rich.markup import escape

        class Labelled(RichProgressBar):
            @property
            def predict_description(self) -> str:
                return escape(label)  # schedule labels hold brackets: not markup

        return Labelled()

    class LabelledTqdm(TQDMProgressBar):
        @property
        def predict_description(self) -> str:
            return label

        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
            self.predict_progress_bar.set_description(label)  # without tqdm's " DataLoader 0"

    return LabelledTqdm()
