"""Attention analyses (Figures 2-3, Appendix A) and the change-point schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_inputs, tiny_llava

from research.analysis import AttentionShifts, TextDynamics, iou_matrix, shift_layer
from research.pruning import PruningEngine, PruningPlan
from schedules import SCHEDULES
from schedules.changepoint import changepoint_layers


def eq10_minimiser(curve: np.ndarray, min_size: int = 2) -> int:
    """Paper Eq. 10 by brute force: the split b minimising the two segments' squared deviations."""
    costs = {b: ((curve[:b] - curve[:b].mean()) ** 2).sum() + ((curve[b:] - curve[b:].mean()) ** 2).sum()
             for b in range(min_size, len(curve) - min_size + 1)}
    return min(costs, key=costs.get)


def test_shift_layer_of_a_step_is_the_layer_before_it():
    attention = np.full(16, 0.01)
    attention[6] = 5.0  # the token becomes critical at layer 6: its cumulative curve steps there
    assert shift_layer(np.cumsum(attention)) == 5  # the last layer of the first regime


@pytest.mark.parametrize("seed", range(5))
def test_shift_layer_is_eq10_on_kinked_curves(seed):
    rng = np.random.default_rng(seed)
    kink = int(rng.integers(3, 13))
    attention = np.where(np.arange(16) < kink, 0.05, 1.0) + rng.random(16) * 0.01
    curve = np.cumsum(attention)
    assert shift_layer(curve) == eq10_minimiser(curve) - 1


def test_iou_of_identical_and_disjoint_rankings():
    same = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0]]], dtype=torch.bool)
    disjoint = torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(iou_matrix(same)[0], torch.ones(2, 2))
    assert iou_matrix(disjoint)[0, 0, 1] == 0 and iou_matrix(disjoint)[0, 0, 0] == 1


def paper_histogram() -> np.ndarray:
    h = np.zeros(32)
    h[1] = 300
    h[10:21] = [40, 60, 80, 90, 100, 95, 90, 80, 70, 60, 40]
    h[[3, 5, 25, 28]] = 3
    return h


def test_changepoint_rule_on_synthetic_histograms():
    assert changepoint_layers(paper_histogram()) == [1, 10, 20]
    assert changepoint_layers(np.ones(32)) == [0, 30]  # flat: no spike, the dense region is everything
    single = np.zeros(32)
    single[14] = 50
    assert changepoint_layers(single) == [14]
    schedule = SCHEDULES.get("changepoint")(histogram=paper_histogram().astype(int).tolist())
    assert schedule.locations(32) == [1, 10, 20]
    assert SCHEDULES.get("changepoint")(layers=[2, 5]).locations(8) == [2, 5]
    with pytest.raises(ValueError, match="calibrates it"):
        SCHEDULES.get("changepoint")().locations(32)


def test_observer_equals_eager_output_attentions():
    model = tiny_llava("eager")
    inputs = tiny_inputs([5, 9, 7])
    seen = {}

    def observe(signals):
        seen[signals.layer_idx] = (signals.t2t, signals.t2v, signals.layout)

    with torch.no_grad(), PruningEngine(model, None, PruningPlan.of([], []), observe=observe) as engine:
        observed = model(**inputs).logits
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    assert torch.equal(observed, out.logits)  # observing changes nothing
    assert engine.records[-1].kept == []
    for layer, (t2t, t2v, layout) in seen.items():
        attention = out.attentions[layer].mean(1)  # [B, S, S] head mean
        rows = attention.gather(1, layout.text[:, :, None].expand(-1, -1, attention.shape[-1]))
        valid = layout.text_valid[:, :, None]
        expected_t2t = rows.gather(2, layout.text[:, None, :].expand(-1, rows.shape[1], -1)) * valid
        expected_t2v = rows.gather(2, layout.vision[:, None, :].expand(-1, rows.shape[1], -1)) * valid
        expected_t2t = expected_t2t * layout.text_valid[:, None, :]
        torch.testing.assert_close(t2t, expected_t2t, atol=1e-5, rtol=0)
        torch.testing.assert_close(t2v, expected_t2v, atol=1e-5, rtol=0)
    assert sorted(seen) == list(range(6))


def test_observers_aggregate_without_growing():
    model = tiny_llava()
    dynamics, shifts = TextDynamics(6), AttentionShifts(6)

    def both(signals):
        dynamics(signals)
        shifts(signals)

    sizes = []
    for seed in range(3):
        with torch.no_grad(), PruningEngine(model, None, PruningPlan.of([], []), observe=both):
            model(**tiny_inputs([5, 9, 7], seed=seed))
        sizes.append((dynamics.iou_sum.numel(), shifts.histogram.size, len(dynamics._layers), len(shifts._layers)))
    assert sizes[0] == sizes[-1] == (36, 6, 0, 0)  # fixed-size accumulators, per-forward buffers emptied
    assert dynamics.samples == shifts.samples == 9
    matrix = dynamics.matrix()
    assert np.allclose(np.diag(matrix), 1) and (matrix <= 1 + 1e-9).all()
    assert shifts.histogram.sum() == 9 * round(0.1 * 64)  # top 10% of 64 vision tokens per sample
