"""Change-point schedule (AdaptInfer Sec. "Layer-wise Pruning Schedule", Figure 3, Appendix A).

The paper read its locations [1, 10, 20] off the histogram of attention-shift layers of LLaVA-1.5-7B:
prune right after the early spike, then at the two edges of the dense region (never inside it,
where important tokens still change). ``changepoint_layers`` turns any such histogram into
locations by that rule:

1. early spike: the fullest layer among the first ``early_fraction`` of the depth, if it holds at
   least ``spike_factor`` times the mean count per layer;
2. dense region: among the layers after the spike (from spike + 2 on), the contiguous run around
   their fullest layer whose counts stay at or above ``level`` times that peak; its first and
   last layers are locations (the last at most ``L - 2``: pruning after the last layer saves nothing).

Documented results: the paper's shape on 32 layers gives [1, 10, 20]; a flat histogram has no
spike and its dense region is every layer: [0, 30] for 32 layers; a single peak at layer p gives [p].

By default the histogram comes from a calibration run of the experiment's own model on
``samples`` samples of its dataset (``python -m research.run`` does it, caches it on disk keyed by
model, dataset and N, and logs it); ``layers=[...]`` skips calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from schedules.base import SCHEDULES, Schedule


def changepoint_layers(
    histogram: Sequence[float], early_fraction: float = 0.25, level: float = 0.2, spike_factor: float = 2.0
) -> list[int]:
    """Pruning locations from a histogram of shift layers (index = layer); see the module docstring."""
    counts = np.asarray(histogram, dtype=np.float64)
    if counts.ndim != 1 or len(counts) < 2 or counts.sum() <= 0:
        raise ValueError(f"a shift histogram needs >= 2 layers and some counts, got {counts.tolist()}")
    locations = []
    early = max(1, int(round(early_fraction * len(counts))))
    spike = int(np.argmax(counts[:early]))
    start = 0
    if counts[spike] >= spike_factor * counts.mean():
        locations.append(spike)
        start = spike + 2
    rest = counts[start:]
    if rest.sum() > 0:
        peak = int(np.argmax(rest))
        dense = rest >= level * rest[peak]
        first, last = peak, peak
        while first > 0 and dense[first - 1]:
            first -= 1
        while last < len(rest) - 1 and dense[last + 1]:
            last += 1
        locations += [start + first, min(start + last, len(counts) - 2)]
    return sorted(set(locations))


@SCHEDULES.register("changepoint")
@dataclass
class Changepoint(Schedule):
    """Locations derived from the model's own attention-shift histogram (or given by ``layers``)."""

    layers: list[int] | None = None  # explicit locations: skips calibration
    samples: int = 200  # calibration samples
    early_fraction: float = 0.25
    level: float = 0.2
    spike_factor: float = 2.0
    histogram: list[int] | None = field(default=None, repr=False)  # set by calibration (or from its cache)

    def propose(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return [int(x) for x in self.layers]
        if self.histogram is None:
            raise ValueError(
                "changepoint needs a shift histogram: python -m research.run calibrates it on the model, "
                "or give layers=[...]"
            )
        if len(self.histogram) != num_layers:
            raise ValueError(f"shift histogram has {len(self.histogram)} layers, the model {num_layers}")
        return changepoint_layers(self.histogram, self.early_fraction, self.level, self.spike_factor)
