"""Attention dynamics on the pruned model: what the observers see of tokens once they are pruned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS, tiny_inputs, tiny_llava

from research.analysis import AttentionShifts, TextDynamics
from research.analysis.per_combination import RelevantRecall, relevant_masks
from research.analysis.shifts import received_in_patch_order
from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

PLAN = PruningPlan.of([1, 3], [32, 12])  # 6 layers, 64 image tokens: 64 on layers 0-1, 32 on 2-3, 12 on 4-5


def _observe(model, inputs, observers, plan=PLAN):
    def observe(signals):
        for observer in observers:
            observer(signals)

    with torch.no_grad(), PruningEngine(model, SCORERS.get("random")(seed=1), plan, observe=observe) as engine:
        model(**inputs, logits_to_keep=1)
    first = (inputs["input_ids"] == IMAGE_TOKEN_ID).int().argmax(1, keepdim=True)
    return [(kept - first).numpy() for kept in engine.last.kept]  # per stage: [B, k] kept patch indices


def test_a_pruned_token_receives_no_attention_after_it_is_gone():
    model, inputs = tiny_llava(), tiny_inputs([5, 8])
    curves = []
    shifts = AttentionShifts(6)
    shifts.add = lambda c: curves.append(c)  # the per-layer attention curves [B, V, L], before the histogram
    kept = _observe(model, inputs, [shifts])
    attention = curves[0]
    assert attention.shape == (2, NUM_IMAGE_TOKENS, 6)
    for b in range(2):
        assert (attention[b, :, :2] > 0).all()  # layers 0-1 run on every patch
        gone_at_2 = np.setdiff1d(np.arange(NUM_IMAGE_TOKENS), kept[0][b])
        assert (attention[b, gone_at_2, 2:] == 0).all() and (attention[b, kept[0][b], 2:4] > 0).all()
        gone_at_4 = np.setdiff1d(np.arange(NUM_IMAGE_TOKENS), kept[1][b])
        assert (attention[b, gone_at_4, 4:] == 0).all() and (attention[b, kept[1][b], 4:] > 0).all()


def test_patch_order_attention_of_an_unpruned_model_is_the_plain_one():
    model, inputs = tiny_llava(), tiny_inputs([5, 8])
    pairs = []
    _observe(model, inputs, [lambda s: pairs.append((received_in_patch_order(s), s.t2v.sum(1)))],
             plan=PruningPlan.of([], []))
    assert len(pairs) == 6 and all(torch.equal(ordered, plain.float()) for ordered, plain in pairs)


def test_relevant_recall_per_layer_is_the_share_of_relevant_patches_kept():
    model, inputs = tiny_llava(), tiny_inputs([5, 8])
    relevant = torch.zeros(2, NUM_IMAGE_TOKENS, dtype=torch.bool)
    relevant[0, :10] = True
    relevant[1, 20:50] = True
    recall, text = RelevantRecall(6), TextDynamics(6)
    recall.begin(relevant)
    kept = _observe(model, inputs, [recall, text])
    expected = [1.0, 1.0]
    for stage in kept:
        shares = [relevant[b, stage[b]].sum().item() / relevant[b].sum().item() for b in range(2)]
        expected += [float(np.mean(shares))] * 2
    assert np.allclose(recall.per_layer(), expected) and expected[-1] < 1.0
    assert text.samples == 2 and 0 <= text.adjacent_mean() <= 1  # question tokens are never pruned


def test_relevant_masks_need_one_entry_per_vision_token():
    class Sample:
        def __init__(self, relevant):
            self.relevant = relevant

    grid = np.zeros((8, 8), dtype=bool)
    grid[0, 0] = True
    assert relevant_masks([Sample(grid)], 64).shape == (1, 64)
    assert relevant_masks([Sample(grid)], 65) is None  # a CLS token or another grid: no recall
    assert relevant_masks([Sample(np.zeros((8, 8), dtype=bool))], 64) is None  # nothing relevant: undefined
    assert relevant_masks([object()], 64) is None


@pytest.mark.slow
def test_every_combination_of_the_default_experiment_logs_its_dynamics(tmp_path):
    """``experiment=ablation_locations`` on the shipped model (few samples): each of its 11 combinations, vanilla
    included, has the mIoU heatmap, the shift histogram and the relevant-patch recall in its TensorBoard run, and
    the summary has their columns."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from research.config import load_config
    from research.run import run

    out = tmp_path / "runs"
    rows = run(load_config(["experiment=ablation_locations", f"output_dir={out}", "data.limit=8", "eval.batch_size=8",
                            "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=0",
                            "eval.analysis_samples=4"]))
    assert len(rows) == 11 and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert 0 <= row["adjacent_miou"] <= 1 and 0 <= row["relevant_recall"] <= 1 and row["shift_layers"], row
    assert rows[0]["relevant_recall"] == 1.0  # vanilla keeps every patch
    board = out / "ablation_locations" / "tensorboard"
    runs = sorted({p.parent for p in board.rglob("events.out.tfevents.*")} - {board / "summary", board / "calibration"})
    assert len(runs) == 11
    for run_dir in runs:
        events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        assert {"dynamics/text_miou", "dynamics/shift_histogram", "dynamics/relevant_recall"} <= set(
            events.Tags()["images"]), run_dir
        assert {"metrics/adjacent_miou", "metrics/relevant_recall"} <= set(events.Tags()["scalars"]), run_dir
