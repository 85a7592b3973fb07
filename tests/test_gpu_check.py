"""``python -m research.gpu_check``: the CPU run CI makes (``--device cpu --size tiny``) writes every section of the
report; the 7B shapes are the released models' (checked on the meta device: nothing is allocated); the budget
leaves sections out and says so; bad arguments are one line. No assertion depends on how fast anything runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch
import transformers

from research import gpu_check
from research.bench import interleaved_times
from research.gpu_check import BUDGETS, LLM_SCORERS, PRUNED, Budget, main
from research.models.testing import random_config, random_inputs, random_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_cpu_check_writes_every_section_with_finite_efficiencies(tmp_path):
    done = subprocess.run([sys.executable, "-m", "research.gpu_check", "--device", "cpu", "--size", "tiny", "--out",
                           str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    header = report["header"]
    assert header["device"] == "cpu" and header["dtypes"] == ["float32"] and header["size"] == "tiny"
    assert (header["torch"], header["transformers"], header["lightning"]) == (
        torch.__version__, transformers.__version__, lightning.__version__)
    tests = report["gpu_tests"]  # no CUDA here: every gpu-marked test skipped, with the reason
    assert tests["tests"] == tests["skipped"] > 0 and tests["failures"] == tests["errors"] == tests["passed"] == 0
    assert any("CUDA" in reason for reason in tests["skip_reasons"])
    assert report["skipped_sections"] == {}
    for key in ("llava15/float32", "qwen2_vl/float32"):
        prefill = report["prefill"][key]
        rows = prefill["variants"]
        expected = {"vanilla", "hooks_full_budget", *(f"{s}@{b}" for s in LLM_SCORERS for b in BUDGETS),
                    *(f"ceiling@{b}" for b in BUDGETS), *(f"ceiling_before_llm@{b}" for b in BUDGETS)}
        assert expected <= set(rows), key
        assert any(name.startswith("divprune@") for name in rows), key  # a scorer before the LLM was timed
        for name, row in rows.items():
            assert row["median_ms"] > 0 and row["peak_memory_mb"] is None, name  # no allocator figure on a CPU
            assert row["vision_tower_ms"] > 0 and row["projector_ms"] > 0 and row["language_model_ms"] > 0, name
            if not name.startswith(("vanilla", "hooks", "ceiling")):
                assert math.isfinite(row["efficiency"]) and row["efficiency"] > 0, name
        assert prefill["image_tokens"] == 64 and prefill["average_tokens"] == {"192": 21, "128": 14, "64": 7}
        assert math.isfinite(prefill["hooks_full_budget"]["inside_hooks_fraction_of_vanilla"])
        decode = report["decode"][key]
        assert decode["new_tokens"] == 32 and decode["variants"]["vanilla"]["ms_per_token"] > 0
        assert math.isfinite(decode["variants"][PRUNED]["ratio_to_vanilla"])
        assert set(report["batches"][key]["batches"]) == {"1", "2"}
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert f"torch {torch.__version__}" in markdown and "## prefill llava15/float32" in markdown
    assert "| text_prior@64 |" in markdown and "n/a" in markdown and "gpu-marked tests" in markdown


def test_a_section_the_budget_cannot_hold_is_left_out_and_named():
    budget = Budget(1000.0)
    assert budget.run("prefill", "prefill a", lambda: {"done": True}) == {"done": True}  # the first always runs
    budget.longest["prefill"] = 5000.0  # as if it had taken longer than the whole budget
    assert budget.run("prefill", "prefill b", lambda: {"done": True}) is None
    assert list(budget.skipped) == ["prefill b"] and "a prefill section took 5000 s" in budget.skipped["prefill b"]


@pytest.mark.parametrize("family, layers, hidden, parameters", [
    ("llava15", 32, 4096, 7.06e9), ("qwen2_vl", 28, 3584, 8.29e9)])
def test_the_7b_size_has_the_released_shapes_and_576_image_tokens(family, layers, hidden, parameters):
    model = random_model(family, "7b", device="meta", dtype=torch.bfloat16)  # shapes only, nothing allocated
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size) == (layers, hidden)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.01)
    size = [(672, 672)] if family == "qwen2_vl" else None  # 48 x 48 patches of 14 px, merged 2 x 2
    inputs = random_inputs(model, [40], image_sizes=size)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576


def test_the_7b_size_is_refused_for_a_family_without_it():
    with pytest.raises(ValueError, match="random model size '7b' is given for \\['llava15', 'qwen2_vl'\\] only"):
        random_config("gemma3", "7b")


def test_interleaved_times_runs_every_variant_each_round_after_the_warm_up():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2,
                              time_fn=lambda fn: fn() or 1.0, warmup=1)
    assert calls == ["a", "b"] * 3 and times == {"a": [1.0, 1.0], "b": [1.0, 1.0]}


@pytest.mark.parametrize("argv, message", [
    (["--size", "7b", "--device", "cpu"], "--size 7b on the CPU allocates two 7B models; choose --size tiny"),
    (["--device", "cpu", "--budget-s", "0"], "--budget-s 0.0: give a positive number of seconds"),
    (["--size", "13b"], "argument --size: invalid choice: '13b'"),
])
def test_bad_arguments_are_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([*argv, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_device_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--device", "cuda", "--out", str(tmp_path)])
    assert "--device cuda: no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.slow
def test_every_prefill_variant_runs_on_a_bf16_model(tmp_path):
    """The GPU check times bf16 / fp16 models: every scorer must run on one (atp's fp32 CLIP once failed on a bf16
    VLM's patch states: "expected m1 and m2 to have the same dtype")."""
    device = torch.device("cpu")
    setup = gpu_check.model_setup("llava15", "tiny", device, torch.bfloat16, tmp_path)
    inputs = gpu_check.check_inputs(setup.model, "llava15", "tiny", 1, device, torch.bfloat16)
    variants, _ = gpu_check.prefill_variants(setup, inputs, {})
    runnable, failed = gpu_check.runnable(variants)
    assert failed == {} and {"atp@64", "text_prior@64", "vanilla"} <= set(runnable)
