"""The GPU figures in one command: ``python -m research.gpu_check [--device cuda|cpu] [--size 7b|tiny] [--out DIR]
[--budget-s 480]``; writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``.

Random-weight models with the real shapes (``--size 7b``: LLaVA-1.5-7B's CLIP ViT-L/14-336 + Vicuna-7B, 576 image
tokens; Qwen2-VL-7B on a 672-px image, 576 image tokens; ``research.models.testing``), or tiny ones (``--size
tiny``, 64 image tokens: what CI runs on the CPU so the command cannot rot), in bf16 and fp16 on CUDA (fp32 on the
CPU), sdpa attention. Sections, in order:

* ``gpu_tests``: ``pytest -m gpu`` (tests/test_gpu.py: the engine's four properties in bf16 / fp16, ``StaticCache``,
  a Lightning predict sweep on the GPU) in a subprocess, its pass / fail / skip counts;
* ``prefill`` per family and dtype: vanilla, the engine at full budget (hooks only), ``text_prior`` / ``fastv`` /
  ``pdrop`` after layers ``LOCATIONS`` and every scorer that prunes before the LLM (``pre_llm``) at 192 / 128 / 64
  average image tokens (the same shares of a tiny model's count), and the ceiling: the same model on physically
  shorter inputs with the same tokens per layer (``research.bench.ceiling_forward``). Timed with CUDA events (wall
  time on the CPU), a warm-up round, then rounds of all variants interleaved, medians; each split into vision tower
  / projector / language model (the rest of the forward); speed-up over vanilla, efficiency = speed-up / its
  ceiling's speed-up, peak memory (``torch.cuda.max_memory_allocated``; none on the CPU); the hooks' share of
  vanilla prefill at full budget, inside the hooks (the engine's own timing) and end to end (paired medians);
* ``decode`` per family and dtype: per-token latency over ``DECODE_TOKENS`` new tokens, ``generate`` with a KV
  cache, vanilla vs pruned (a pruned prefill leaves a shorter cache);
* ``batches`` per family: prefill per sample and peak memory at batch 1 / 8 / 32 (CPU: 1 / 2), vanilla and pruned.

``--budget-s``: a section is started only if the time left exceeds the longest section of its kind so far (the
first of each kind always starts); the report lists the sections left out. Absolute times on a shared machine are
noise; the ratios within one run are the figures to read.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from research.bench import (
    bench_clip,
    ceiling_forward,
    interface_scorers,
    interleaved_times,
    make_scorer,
    prefill_call,
    refused_scorers,
)
from research.models import adapter_for
from research.models.testing import random_inputs, random_model
from research.pruning import PruningEngine, PruningPlan
from schedules import solve_budget
from scorers import SCORERS

CHECKED_FAMILIES = ("llava15", "qwen2_vl")
BUDGETS = (192, 128, 64)  # average image tokens of 576 (the 7B models' count); the same shares at other counts
BASE_IMAGE_TOKENS = 576
LLM_SCORERS = ("text_prior", "fastv", "pdrop")
PRUNED = "text_prior@64"  # the pruned variant of the decode and batch sections (the acceptance's figure)
DECODE_TOKENS = 32
QUESTION_TOKENS = 40
DTYPES = {"cuda": (torch.bfloat16, torch.float16), "cpu": (torch.float32,)}
BATCHES = {"cuda": (1, 8, 32), "cpu": (1, 2)}
REPETITIONS = {"cuda": 10, "cpu": 3}
WARMUP = {"cuda": 1, "cpu": 0}  # untimed rounds before the timed ones (each variant's probe call warms up too)
TINY_LAYERS = 12  # a tiny LLM deep enough for an average of 7 of 64 image tokens (64 of 576)
IMAGE_GRID = {"7b": 24, "tiny": 8}  # merged-patch grid side of the families whose image size sets the count
ROOT = Path(__file__).resolve().parent.parent
PROBE_ERRORS = (ValueError, OSError, RuntimeError, TypeError, NotImplementedError)


# ---- timing ------------------------------------------------------------------------------------------------------
class Clock:
    """Times calls on ``device``: CUDA events on a GPU (one synchronize per call), ``perf_counter`` on the CPU;
    forward hooks on the vision tower and the projector split each call into tower / projector / the rest."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.current: str = ""
        self.splits: dict[str, list[dict[str, float]]] = {}
        self._open: dict[str, list[Any]] = {}
        self._spans: dict[str, list[tuple[Any, Any]]] = {}

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def between(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start

    @contextlib.contextmanager
    def watching(self, parts: dict[str, nn.Module]) -> Iterator[None]:
        """Hooks timing each of ``parts`` (name -> module) while the block runs."""
        handles = []
        for name, module in parts.items():
            def before(*_: Any, name: str = name) -> None:
                self._open.setdefault(name, []).append(self.mark())

            def after(*_: Any, name: str = name) -> None:
                self._spans.setdefault(name, []).append((self._open[name].pop(), self.mark()))

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def labelled(self, name: str, fn: Callable[[], object]) -> Callable[[], object]:
        """``fn``, its calls' splits filed under ``name``."""
        def call() -> object:
            self.current = name
            return fn()

        return call

    def time(self, fn: Callable[[], object]) -> float:
        """Seconds of one call of ``fn`` (a :meth:`labelled` one), its split filed under its name."""
        self._spans.clear()
        start = self.mark()
        fn()
        end = self.mark()
        if self.cuda:
            torch.cuda.synchronize()
        spans = {name: sum(self.between(a, b) for a, b in pairs) for name, pairs in self._spans.items()}
        self.splits.setdefault(self.current, []).append(spans)
        return self.between(start, end)


def median_split(splits: list[dict[str, float]], total: float, projector_in_tower: bool) -> dict[str, float | None]:
    """Median vision tower / projector / language model milliseconds (the language model: the rest of the call)."""
    def part(name: str) -> float | None:
        values = [s[name] for s in splits if name in s]
        return statistics.median(values) if values else None

    tower, projector = part("vision_tower"), part("projector")
    if tower is not None and projector is not None and projector_in_tower:
        tower -= projector
    rest = total - (tower or 0.0) - (projector or 0.0)
    return {"vision_tower_ms": None if tower is None else 1000 * tower,
            "projector_ms": None if projector is None else 1000 * projector, "language_model_ms": 1000 * rest}


def peak_memory_mb(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak GPU memory of one call of ``fn`` (MiB); None on the CPU (no allocator figure to report)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 2**20


# ---- models and variants -----------------------------------------------------------------------------------------
def check_model(family: str, size: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A random-weight model of ``family`` at ``size``, built on ``device`` in ``dtype`` directly, sdpa."""
    layers = TINY_LAYERS if size == "tiny" else None
    return random_model(family, size, num_layers=layers, device=device, dtype=dtype)


def check_inputs(model: nn.Module, family: str, size: str, batch: int, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``batch`` rows of one image and a ``QUESTION_TOKENS``-token question, on ``device``, pixels in ``dtype``.
    Families whose image sets the token count get a square image of ``IMAGE_GRID[size]``^2 tokens (576 at 7b)."""
    vision = model.config.vision_config
    sizes = None
    if hasattr(vision, "spatial_merge_size"):
        side = IMAGE_GRID[size] * vision.patch_size * vision.spatial_merge_size
        sizes = [(side, side)] * batch
    inputs = random_inputs(model, [QUESTION_TOKENS] * batch, image_sizes=sizes)
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def layer_locations(num_layers: int, size: str) -> list[int]:
    """Pruning locations of the LLM scorers: after layer 1 (7b; 0 tiny), a quarter and half of the depth."""
    return sorted({1 if size == "7b" else 0, num_layers // 4, num_layers // 2})


@dataclass
class Setup:
    """One model's figures needed by every section."""

    family: str
    size: str
    model: nn.Module
    device: torch.device
    num_layers: int
    num_vision: int
    locations: list[int]
    keep: dict[int, int]  # budget (of 576) -> average image tokens at this model's count
    clip: Path | None = None
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def adapter(self) -> Any:
        return adapter_for(self.model)

    def layer_plan(self, budget: int) -> PruningPlan:
        return solve_budget(self.locations, self.num_layers, self.num_vision, self.keep[budget]).plan()

    def interface_plan(self, budget: int) -> PruningPlan:
        return PruningPlan.of([-1], [self.keep[budget]])


def prefill_variants(setup: Setup, inputs: dict, record: dict) -> tuple[dict[str, Callable[[], object]], dict]:
    """Every prefill variant (name -> call) and, per pruned variant, the ceiling it is compared with."""
    model, adapter = setup.model, setup.adapter
    full = PruningPlan.of(setup.locations, [setup.num_vision] * len(setup.locations))
    variants = {"vanilla": prefill_call(model, inputs),
                "hooks_full_budget": prefill_call(model, inputs, SCORERS.get("text_prior")(), full,
                                             lambda last: record.setdefault("hook", []).append(last.hook_seconds))}
    ceilings: dict[str, str] = {}
    for budget in BUDGETS:
        layers, interface = setup.layer_plan(budget), setup.interface_plan(budget)
        for name in LLM_SCORERS:
            variants[f"{name}@{budget}"] = prefill_call(model, inputs, SCORERS.get(name)(), layers)
            ceilings[f"{name}@{budget}"] = f"ceiling@{budget}"
        for name in (n for n in interface_scorers() if n not in setup.refused):
            variants[f"{name}@{budget}"] = prefill_call(model, inputs, make_scorer(name, setup.clip), interface)
            ceilings[f"{name}@{budget}"] = f"ceiling_before_llm@{budget}"
        for ceiling, plan in ((f"ceiling@{budget}", layers), (f"ceiling_before_llm@{budget}", interface)):
            per_layer = plan.tokens_per_layer(setup.num_layers, setup.num_vision)
            variants[ceiling] = lambda per_layer=per_layer: ceiling_forward(adapter, inputs, per_layer)
    return variants, ceilings


def runnable(variants: dict[str, Callable[[], object]]) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """The variants whose first call succeeds, and why each other one cannot run (its error's first line)."""
    kept, skipped = {}, {}
    for name, fn in variants.items():
        try:
            fn()
        except PROBE_ERRORS as error:
            skipped[name] = f"{type(error).__name__}: {error}".splitlines()[0]
        else:
            kept[name] = fn
    return kept, skipped


def tower_parts(adapter: Any) -> tuple[dict[str, nn.Module], bool]:
    """The modules timed apart (vision tower, projector) and whether the projector runs inside the tower
    (Qwen2-VL's ``visual.merger``)."""
    tower = adapter.vision_tower
    projector = getattr(adapter, "projector", None) or getattr(tower, "merger", None)
    parts = {"vision_tower": tower} | ({"projector": projector} if projector is not None else {})
    inside = projector is not None and any(m is projector for m in tower.modules())
    return parts, inside


# ---- sections ----------------------------------------------------------------------------------------------------
def prefill_section(setup: Setup, dtype: torch.dtype, repetitions: int) -> dict:
    """Every prefill variant timed interleaved (medians), split, against vanilla and its ceiling."""
    device, model = setup.device, setup.model
    inputs = check_inputs(model, setup.family, setup.size, 1, device, dtype)
    record: dict[str, list[float]] = {}
    variants, ceilings = prefill_variants(setup, inputs, record)
    clock = Clock(device)
    parts, projector_in_tower = tower_parts(setup.adapter)
    with clock.watching(parts):
        variants, skipped = runnable(variants)
        labelled = {name: clock.labelled(name, fn) for name, fn in variants.items()}
        record.clear()
        times = interleaved_times(labelled, repetitions, clock.time, warmup=WARMUP[device.type])
    vanilla = statistics.median(times["vanilla"])
    paired = [h / v for h, v in zip(times["hooks_full_budget"], times["vanilla"])]
    hooks = {"inside_hooks_fraction_of_vanilla": statistics.median(record["hook"][-repetitions:]) / vanilla,
             "end_to_end_fraction_of_vanilla": statistics.median(paired) - 1}  # before the peak-memory calls
    rows = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        rows[name] = {"median_ms": 1000 * median, "speedup": vanilla / median,
                      **median_split(clock.splits[name][-len(samples):], median, projector_in_tower),
                      "peak_memory_mb": peak_memory_mb(device, variants[name])}
    for name, ceiling in ceilings.items():
        if name in rows:
            ceiling_speedup = rows[ceiling]["speedup"] if ceiling in rows else math.nan
            rows[name] |= {"ceiling": ceiling, "ceiling_speedup": ceiling_speedup,
                           "efficiency": rows[name]["speedup"] / ceiling_speedup}
    return {"dtype": dtype_name(dtype), "image_tokens": setup.num_vision, "locations": setup.locations,
            "average_tokens": {f"{b}": setup.keep[b] for b in BUDGETS},
            "sequence_length": int(inputs["input_ids"].shape[1]), "repetitions": repetitions, "variants": rows,
            "hooks_full_budget": hooks, "not_timed": skipped}


def generate(model: nn.Module, inputs: dict, tokens: int, scorer: object | None,
             plan: PruningPlan | None) -> Callable[[], object]:
    """Greedy ``generate`` of exactly ``tokens`` new tokens with a KV cache, vanilla or pruned."""
    def call() -> object:
        with torch.no_grad(), PruningEngine(model, scorer, plan) if plan else contextlib.nullcontext():
            return model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    return call


def decode_section(setup: Setup, dtype: torch.dtype, repetitions: int) -> dict:
    """Per-token decode latency: (generate 1 + ``DECODE_TOKENS`` tokens - generate 1) / ``DECODE_TOKENS``."""
    inputs = check_inputs(setup.model, setup.family, setup.size, 1, setup.device, dtype)
    pruned = {"vanilla": (None, None), PRUNED: (SCORERS.get("text_prior")(), setup.layer_plan(64))}
    variants = {}
    for name, (scorer, plan) in pruned.items():
        for tokens in (1, 1 + DECODE_TOKENS):
            variants[name, tokens] = generate(setup.model, inputs, tokens, scorer, plan)
    clock = Clock(setup.device)
    times = interleaved_times(variants, few(repetitions, setup.device), clock.time, warmup=WARMUP[setup.device.type])
    rows = {}
    for name in pruned:
        first, whole = (statistics.median(times[name, n]) for n in (1, 1 + DECODE_TOKENS))
        rows[name] = {"ms_per_token": 1000 * max(0.0, whole - first) / DECODE_TOKENS, "first_token_ms": 1000 * first,
                      "peak_memory_mb": peak_memory_mb(setup.device, variants[name, 1 + DECODE_TOKENS])}
    rows[PRUNED]["ratio_to_vanilla"] = rows[PRUNED]["ms_per_token"] / rows["vanilla"]["ms_per_token"]
    return {"dtype": dtype_name(dtype), "new_tokens": DECODE_TOKENS, "variants": rows}


def batch_section(setup: Setup, dtype: torch.dtype, batches: tuple[int, ...], repetitions: int) -> dict:
    """Prefill per sample and peak memory at each batch size, vanilla and pruned (``PRUNED``)."""
    rows: dict[str, dict] = {}
    for batch in batches:
        inputs = check_inputs(setup.model, setup.family, setup.size, batch, setup.device, dtype)
        variants = {"vanilla": prefill_call(setup.model, inputs),
                    PRUNED: prefill_call(setup.model, inputs, SCORERS.get("text_prior")(), setup.layer_plan(64))}
        times = interleaved_times(variants, few(repetitions, setup.device), Clock(setup.device).time,
                                  warmup=WARMUP[setup.device.type])
        row = {name: {"ms_per_sample": 1000 * statistics.median(samples) / batch,
                      "peak_memory_mb": peak_memory_mb(setup.device, variants[name])}
               for name, samples in times.items()}
        row[PRUNED]["speedup"] = row["vanilla"]["ms_per_sample"] / row[PRUNED]["ms_per_sample"]
        rows[str(batch)] = row
    return {"dtype": dtype_name(dtype), "batches": rows}


def gpu_tests_section(out: Path, timeout: float) -> dict:
    """``pytest -m gpu tests/test_gpu.py`` in a subprocess; its counts from the JUnit XML it writes."""
    tests = ROOT / "tests" / "test_gpu.py"
    if not tests.is_file():
        return {"command": None, "error": f"{tests} not found (run from a clone of the repository)"}
    report = out / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               str(tests)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[1:]), "error": f"timed out after {timeout:.0f} s"}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    skip_reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return {"command": "python " + " ".join(command[1:]), "returncode": done.returncode, **counts,
            "skip_reasons": skip_reasons, "tail": done.stdout[-2000:]}


# ---- the run -----------------------------------------------------------------------------------------------------
class Budget:
    """Seconds left of ``seconds``; a section starts only if more is left than the longest of its kind took."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()
        self.longest: dict[str, float] = {}
        self.skipped: dict[str, str] = {}

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def run(self, kind: str, name: str, section: Callable[[], dict]) -> dict | None:
        """``section()``, or None (listed in :attr:`skipped`) if the budget cannot hold it."""
        needed = self.longest.get(kind, 0.0)
        if self.left() <= needed:
            self.skipped[name] = f"{self.left():.0f} s of the budget left, a {kind} section took {needed:.0f} s"
            return None
        began = time.monotonic()
        result = section()
        self.longest[kind] = max(needed, time.monotonic() - began)
        return result


def few(repetitions: int, device: torch.device) -> int:
    """Rounds of the longer sections (decode, batches): half the prefill's, at least 3 on a GPU, 1 on the CPU."""
    return max(3 if device.type == "cuda" else 1, repetitions // 2)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def header(device: torch.device, size: str, budget_s: float) -> dict:
    import lightning
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": device.type, "device_name": name, "size": size,
            "dtypes": [dtype_name(d) for d in DTYPES[device.type]], "attention": "sdpa",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "lightning": lightning.__version__, "python": platform.python_version(), "budget_s": budget_s,
            "threads": torch.get_num_threads()}


def model_setup(family: str, size: str, device: torch.device, dtype: torch.dtype, clip_dir: Path) -> Setup:
    model = check_model(family, size, device, dtype)
    adapter = adapter_for(model)
    inputs = check_inputs(model, family, size, 1, device, dtype)
    num_vision = int((inputs["input_ids"] == adapter.image_token_id).sum())
    keep = {b: max(1, round(b * num_vision / BASE_IMAGE_TOKENS)) for b in BUDGETS}
    vision = model.config.vision_config
    clip = None
    if vision.model_type == "clip_vision_model":  # atp / cdpruner embed the question with CLIP's text tower
        small = copy.deepcopy(vision)
        small.num_hidden_layers = 1  # they use only the tower's post-layernorm and projection, not its layers
        clip = bench_clip(clip_dir / family, small)
    return Setup(family, size, model, device, adapter.num_layers, num_vision,
                 layer_locations(adapter.num_layers, size), keep, clip, refused_scorers(family))


def run_check(device: torch.device, size: str, out: Path, budget_s: float, repetitions: int | None = None) -> dict:
    """Every section within ``budget_s``; returns the report (also written by :func:`write_report`)."""
    budget = Budget(budget_s)
    reps = repetitions or REPETITIONS[device.type]
    report: dict[str, Any] = {"header": header(device, size, budget_s), "prefill": {}, "decode": {}, "batches": {}}
    report["gpu_tests"] = budget.run("gpu_tests", "gpu_tests", lambda: gpu_tests_section(out, budget.left() / 3))
    with tempfile.TemporaryDirectory() as clip_dir:
        for family in CHECKED_FAMILIES:
            family_sections(report, budget, family, size, device, reps, Path(clip_dir))
            release(device)
    report["skipped_sections"] = budget.skipped
    report["elapsed_s"] = budget_s - budget.left()
    return report


def family_sections(report: dict, budget: Budget, family: str, size: str, device: torch.device, reps: int,
                    clip_dir: Path) -> None:
    """One family's model built once (in the first dtype, cast for the others): prefill and decode per dtype,
    then the batch sizes in the first dtype; into ``report``."""
    first, *others = DTYPES[device.type]
    built = budget.run("build", f"{family}: model", lambda: {"setup": model_setup(family, size, device, first,
                                                                                  clip_dir)})
    if built is None:
        return
    setup = built["setup"]
    for dtype in (first, *others):
        setup.model.to(dtype)
        key = f"{family}/{dtype_name(dtype)}"
        report["prefill"][key] = budget.run("prefill", f"prefill {key}",
                                            lambda d=dtype: prefill_section(setup, d, reps))
        report["decode"][key] = budget.run("decode", f"decode {key}", lambda d=dtype: decode_section(setup, d, reps))
    setup.model.to(first)
    key = f"{family}/{dtype_name(first)}"
    report["batches"][key] = budget.run("batches", f"batches {key}",
                                        lambda: batch_section(setup, first, BATCHES[device.type], reps))


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the report --------------------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def markdown(report: dict) -> str:
    h = report["header"]
    lines = ["# gpu_check", "",
             f"device: {h['device']} ({h['device_name']}), size {h['size']}, dtypes {', '.join(h['dtypes'])}, "
             f"attention {h['attention']}; torch {h['torch']} (CUDA {h['cuda']}), transformers {h['transformers']}, "
             f"lightning {h['lightning']}, Python {h['python']}; budget {h['budget_s']:.0f} s, took "
             f"{report['elapsed_s']:.0f} s.", ""]
    tests = report.get("gpu_tests")
    if tests and "error" not in tests:
        lines += [f"gpu-marked tests (`{tests['command']}`): {tests['passed']} passed, {tests['failures']} failed, "
                  f"{tests['errors']} errors, {tests['skipped']} skipped"
                  + (f" ({'; '.join(tests['skip_reasons'])})" if tests["skip_reasons"] else ""), ""]
    elif tests:
        lines += [f"gpu-marked tests: not run ({tests['error']})", ""]
    for key, section in report["prefill"].items():
        if section is None:
            continue
        hooks = section["hooks_full_budget"]
        lines += [f"## prefill {key}: {section['image_tokens']} image tokens, sequence {section['sequence_length']}, "
                  f"pruning after layers {section['locations']}, {section['repetitions']} repetitions (medians)", "",
                  f"hooks at full budget: {100 * hooks['inside_hooks_fraction_of_vanilla']:.3f}% of vanilla prefill "
                  f"inside them, {100 * hooks['end_to_end_fraction_of_vanilla']:+.2f}% end to end", "",
                  "| variant | ms | speed-up | efficiency | tower ms | projector ms | LM ms | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in section["variants"].items():
            lines.append(f"| {name} | {fmt(row['median_ms'], '.2f')} | {fmt(row['speedup'], '.2f', 'x')} | "
                         f"{fmt(row.get('efficiency'), '.3f')} | {fmt(row['vision_tower_ms'], '.2f')} | "
                         f"{fmt(row['projector_ms'], '.2f')} | {fmt(row['language_model_ms'], '.2f')} | "
                         f"{fmt(row['peak_memory_mb'], '.0f')} |")
        lines += [f"- {name}: not timed ({reason})" for name, reason in section["not_timed"].items()] + [""]
    for key, section in report["decode"].items():
        if section is None:
            continue
        lines.append(f"decode {key} ({section['new_tokens']} new tokens): " + ", ".join(
            f"{name} {fmt(row['ms_per_token'], '.2f')} ms/token (peak {fmt(row['peak_memory_mb'], '.0f')} MiB)"
            for name, row in section["variants"].items())
                     + f"; pruned / vanilla {fmt(section['variants'][PRUNED]['ratio_to_vanilla'], '.3f')}")
    lines.append("")
    for key, section in report["batches"].items():
        if section is None:
            continue
        lines += [f"## batch sizes {key}", "", "| batch | vanilla ms/sample | pruned ms/sample | speed-up | "
                  "vanilla peak MiB | pruned peak MiB |", "|---|---|---|---|---|---|"]
        for batch, row in section["batches"].items():
            v, p = row["vanilla"], row[PRUNED]
            lines.append(f"| {batch} | {fmt(v['ms_per_sample'], '.2f')} | {fmt(p['ms_per_sample'], '.2f')} | "
                         f"{fmt(p['speedup'], '.2f', 'x')} | {fmt(v['peak_memory_mb'], '.0f')} | "
                         f"{fmt(p['peak_memory_mb'], '.0f')} |")
        lines.append("")
    lines += [f"- {name}: skipped ({reason})" for name, reason in report["skipped_sections"].items()]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--size", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections near this (seconds)")
    parser.add_argument("--repetitions", type=int, default=None, help="timed rounds (default: cuda 10, cpu 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU (1 = least noisy)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s}: give a positive number of seconds, e.g. 480")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device is visible to torch {torch.__version__}; choose --device cpu")
    if args.size == "7b" and args.device == "cpu" and os.environ.get("VTPRUNE_7B_ON_CPU") != "1":
        parser.error("--size 7b on the CPU allocates two 7B models; choose --size tiny (or set VTPRUNE_7B_ON_CPU=1)")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run_check(torch.device(args.device), args.size, args.out, args.budget_s, args.repetitions)
    write_report(report, args.out)
    print(markdown(report))
    print(f"written: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'}")


if __name__ == "__main__":
    main()
