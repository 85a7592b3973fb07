"""The engine's four properties on a GPU in bf16 and fp16, cached decode with transformers' ``StaticCache``, and a
Lightning predict sweep with ``trainer.accelerator=gpu`` (``pytest -m gpu``; ``python -m research.gpu_check`` runs
them and records the counts). Skipped, with the reason, where torch sees no CUDA device.

The properties and their references are tests/test_engine.py's (the CPU, float32 versions); here each states the
tolerance half precision needs, since a pruned run and its reference add in a different order:

* full budget: logits bitwise equal to vanilla (the same kernels on the same shapes: exact in any dtype);
* pruned forward == the unpruned model with the pruned keys masked, at kept positions: ``PRUNED_ATOL``;
* cached greedy decode (dynamic and ``StaticCache``) == no-cache recompute of the same tokens: ``DECODE_ATOL``;
* each row of a left-padded batch == that row alone: first-step logits within ``ROW_ATOL`` and at least
  ``ROW_KEPT_OVERLAP`` of the kept image tokens the same (near-ties of the scores may swap a few in half precision).

``VTPRUNE_GPU_TEST_DEVICE=cpu`` runs them on the CPU (in bf16 / fp16 there too) to check the tests themselves.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from test_engine import (
    INTERFACE_PLAN,
    LOCATION_KINDS,
    PLAN,
    EmbeddingNorm,
    batch,
    greedy_with_cache,
    logits,
    pruned_and_masked_reference,
    recompute_without_cache,
)
from tiny import NUM_IMAGE_TOKENS, row, tiny_llava

from research.pruning import PruningPlan
from scorers import SCORERS

DEVICE = os.environ.get("VTPRUNE_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device: torch.cuda.is_available() is False"),
]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# absolute tolerances on the tiny model's logits (|logit| < 1): bf16 keeps 8 mantissa bits, fp16 11
PRUNED_ATOL = {"bfloat16": 3e-2, "float16": 4e-3}
DECODE_ATOL = {"bfloat16": 3e-2, "float16": 4e-3}
ROW_ATOL = {"bfloat16": 3e-2, "float16": 4e-3}
ROW_KEPT_OVERLAP = 0.9


@pytest.fixture(scope="module", params=list(DTYPES))
def half(request) -> tuple[str, torch.nn.Module]:
    """(dtype name, the tiny sdpa LLaVA of tests/test_engine.py on the device in that dtype)."""
    return request.param, tiny_llava("sdpa").to(DEVICE, DTYPES[request.param])


def on_device(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}


@pytest.mark.parametrize("size", [1, 3])
def test_full_budget_is_bitwise_vanilla_on_the_gpu(half, size):
    name, model = half
    inputs = on_device(batch(size), DTYPES[name])
    vanilla, _ = logits(model, inputs)
    full = PruningPlan.of(locations=[1, 3], keep=[NUM_IMAGE_TOKENS, NUM_IMAGE_TOKENS])
    pruned, _ = logits(model, inputs, {"scorer": SCORERS.get("text_prior")(), "plan": full})
    assert pruned.device.type == DEVICE and pruned.dtype == DTYPES[name]
    assert torch.equal(pruned, vanilla)


@pytest.mark.parametrize("plan", [PLAN, INTERFACE_PLAN], ids=["layers-1-3", "interface"])
@pytest.mark.parametrize("size", [1, 3])
def test_pruned_forward_equals_masked_reference_on_the_gpu(half, size, plan):
    name, model = half
    pruned, reference, _, valid = pruned_and_masked_reference(model, on_device(batch(size), DTYPES[name]), plan)
    torch.testing.assert_close(pruned[valid].float(), reference[valid].float(), atol=PRUNED_ATOL[name], rtol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", list(LOCATION_KINDS))
def test_cached_decode_equals_no_cache_recompute_on_the_gpu(half, kind, cache):
    """``cache="static"``: transformers' ``StaticCache`` (``cache_implementation="static"``)."""
    name, model = half
    inputs = on_device(batch(3), DTYPES[name])
    plan = LOCATION_KINDS[kind]
    scorer = SCORERS.get("text_prior" if kind == "layers-1-3" else "random")()
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    tokens, cached_logits, record = greedy_with_cache(model, inputs, {"scorer": scorer, "plan": plan}, **extra)
    recomputed = recompute_without_cache(model, inputs, tokens, plan, record)
    torch.testing.assert_close(cached_logits.float(), recomputed.float(), atol=DECODE_ATOL[name], rtol=0)


@pytest.mark.parametrize("plan", [PLAN, INTERFACE_PLAN], ids=["layers-1-3", "interface"])
def test_padded_rows_equal_rows_alone_on_the_gpu(half, plan):
    name, model = half
    inputs = on_device(batch(3), DTYPES[name])
    scorer = SCORERS.get("text_prior")() if plan.locations[0] >= 0 else EmbeddingNorm()
    _, step_logits, record = greedy_with_cache(model, inputs, {"scorer": scorer, "plan": plan}, steps=1)
    padding = (inputs["attention_mask"] == 0).sum(1)
    for i in range(3):
        _, alone_logits, alone = greedy_with_cache(model, row(inputs, i), {"scorer": scorer, "plan": plan}, steps=1)
        for stage_kept, alone_kept in zip(record.kept, alone.kept):
            together = set((stage_kept[i] - padding[i]).tolist())
            assert len(together & set(alone_kept[0].tolist())) >= ROW_KEPT_OVERLAP * len(together)
        torch.testing.assert_close(step_logits[i].float(), alone_logits[0].float(), atol=ROW_ATOL[name], rtol=0)


def test_a_lightning_predict_sweep_runs_on_the_gpu(micro_model, tmp_path, monkeypatch):
    """``trainer.accelerator=gpu``: every combination's predict loop on the device, each sample once."""
    import research.evaluation as evaluation
    from research.config import load_config
    from research.run import run

    devices = []
    measure = evaluation.measure_latency

    def spy(module, *args, **kwargs):
        devices.append(module.model.device.type)
        return measure(module, *args, **kwargs)

    monkeypatch.setattr(evaluation, "measure_latency", spy)
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    rows = run(load_config(["experiment=main_table", f"model.path={micro_model}", f"output_dir={tmp_path}",
                            "scorers=[text_prior,random]", "budgets=[32]", "data.limit=5", "eval.batch_size=2",
                            "eval.latency_samples=1", "eval.decode_tokens=2", "eval.overlays=1",
                            "eval.analysis_samples=2", f"trainer.accelerator={accelerator}"]))
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert devices and set(devices) == {DEVICE}
    with (Path(tmp_path) / "main_table" / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    for path in (Path(tmp_path) / "main_table" / "predictions").glob("*.jsonl"):
        indices = [json.loads(line)["index"] for line in path.read_text().splitlines()]
        assert indices == list(range(5)), path.name
