"""Prefill latency benchmark: ``python -m research.bench [--family F] [--image-tokens 576,2916] [--json PATH]``.

A mid-size random-weight model of the family (default ``llava15``; text hidden 1024, 16 layers, about
576 image tokens, ~40 question tokens; built by ``research.models.testing.random_model(family, "mid")``) is timed
on CPU prefill:

* vanilla;
* the engine installed at full budget (hooks only: their overhead);
* every registered LLM scorer at average budgets 192 and 64, pruning after layers [1, 8];
* every scorer that prunes once before the LLM (``pre_llm``) at the interface, at each image-token count of
  ``--image-tokens`` (llava15's default: 576 and 2,916, the 336-px image's 24 x 24 CLIP grid and a 756-px
  image's 54 x 54 one, about LLaVA-NeXT's 2,880 AnyRes tokens), keeping the same shares (192 / 64 of
  576, 972 / 324 of 2,916), each count's vanilla prefill interleaved with them: its scoring share of that
  vanilla and, per scorer, the growth from the first count to the last (share ratio, scoring-time ratio).
  The scorers that embed the question with CLIP (``atp``, ``cdpruner``) get a random-weight CLIP saved to a
  temporary directory (``bench_clip``: the tower's width, a text tower CLIP-L's scaled as the mid model
  scales LLaMA-7B, the offline word tokenizer); one that still cannot run is listed as not timed, with why;
* the ceiling: the same model, no pruning hooks, its decoder layers run one by one on physically
  shorter inputs with the same per-layer token counts as ``text_prior`` at each budget;
* scorers that merge inside the vision tower (``tome``), where the family can: the mid model's tower has 2
  layers, too few to merge 576 tokens down to 192, so they run on its twin with a CLIP-L-deep tower (24
  layers, features from the 23rd as LLaVA-1.5's), against that twin's own vanilla prefill; the tower alone
  (``get_image_features``: tower + projector) is timed merged and unmerged too, its own speed-up.

Variants are interleaved in every repetition and summarised by medians, as ratios to vanilla
(absolute times on a shared machine are noise; ratios within one run are not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from research.models import FAMILIES, UnsupportedModel, VLMAdapter, adapter_for
from research.models.registry import check_scorers
from research.models.testing import random_config, random_inputs, random_model
from research.pruning import PruningEngine, PruningPlan
from schedules import solve_budget
from scorers import SCORERS

BASE_IMAGE_TOKENS = 576  # the counts BUDGETS are given for; at other counts they keep the same shares
GROWTH_IMAGE_TOKENS = (576, 2916)  # llava15's default for the scorers before the LLM: 24x24 and 54x54 CLIP patches
GRID_FAMILIES = {"llava15"}  # families whose image-token count is a square CLIP grid set by the config's image size
# the CLIP text tower given to the scorers that need one (atp, cdpruner): CLIP ViT-L/14's (768 wide, 12 layers,
# 77 positions) scaled as the mid model scales LLaMA-7B (1/4 the width, 1/2 the depth); random weights
CLIP_TEXT = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                 max_position_embeddings=77)
LOCATIONS = [1, 8]  # [2, 8] cannot reach an average of 64 in 16 layers (layers 0-1 count 576)
BUDGETS = [192, 64]
# image size (pixels) giving about 576 image tokens, for the families whose image sets the count
IMAGE_SIZES = {"qwen2_vl": (672, 672), "qwen2_5_vl": (672, 672), "qwen3_vl": (672, 672), "qwen3_vl_moe": (672, 672),
               "llava_next": (112, 112), "llava_onevision": (112, 112)}


def bench_model(family: str = "llava15") -> nn.Module:
    """The family's mid-size random-weight model (16 layers, hidden 1024)."""
    return random_model(family, size="mid", seed=0)


def deep_tower_model(family: str = "llava15", tower_layers: int = 24) -> nn.Module:
    """The family's mid model with a ``tower_layers``-deep vision tower (CLIP ViT-L's depth), for the scorers
    that merge inside it."""
    config = random_config(family, "mid")
    config.vision_config.num_hidden_layers = tower_layers
    return model_from_config(family, config)


def grid_model(family: str, image_tokens: int, num_layers: int | None = None) -> nn.Module:
    """The family's mid model (``num_layers`` decoder layers if given) with its image a square CLIP grid of
    ``image_tokens`` patches (576: 24 x 24, the 336-px image; 2,916: 54 x 54, a 756-px one)."""
    if family not in GRID_FAMILIES:
        raise ValueError(f"image-token counts other than the model's own need a square-grid family: {family!r} is "
                         f"not one; choose one of {sorted(GRID_FAMILIES)}")
    side = grid_side(image_tokens)
    config = random_config(family, "mid", num_layers)
    config.vision_config.image_size = side * config.vision_config.patch_size
    return model_from_config(family, config)


def grid_side(image_tokens: int) -> int:
    """The side of a square grid of ``image_tokens`` patches; a clear error if there is none."""
    side = math.isqrt(max(image_tokens, 0))
    if image_tokens <= 0 or side * side != image_tokens:
        raise ValueError(f"image tokens {image_tokens} is not a square grid; choose a square, e.g. {side * side} "
                         f"({side}x{side}) or {(side + 1) ** 2} ({side + 1}x{side + 1})")
    return side


def model_from_config(family: str, config: object) -> nn.Module:
    """A random-weight model of ``family`` from ``config`` (seed 0), sdpa attention, eval mode."""
    torch.manual_seed(0)
    model = FAMILIES.get(family).model_type()(config)
    model.config._attn_implementation = "sdpa"
    model.set_attn_implementation("sdpa")
    return model.eval()


def bench_inputs(model: nn.Module, family: str = "llava15", question_tokens: int = 40) -> dict[str, torch.Tensor]:
    size = IMAGE_SIZES.get(family)
    return random_inputs(model, [question_tokens], image_sizes=[size] if size else None)


class _Stop(Exception):
    """Carries the ceiling's logits out of the language model's pre-hook."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


@torch.no_grad()
def ceiling_forward(adapter: VLMAdapter, inputs: dict, tokens_per_layer: list[int]) -> torch.Tensor:
    """The model's own modules with each decoder layer run on a physically shorter sequence.

    The model runs as usual up to its language model (vision tower, projector, the image features put
    in place); there a pre-hook runs the decoder layers itself, each on the sequence less the vision
    tokens pruned before it (dropped from the front: the same lengths without a gather), and stops.
    """
    model, lm = adapter.model, adapter.language_model
    num_vision = int((inputs["input_ids"] == adapter.image_token_id).sum())

    def run_layers(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["inputs_embeds"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        if positions.dim() == 3 and positions.shape[0] == 4:  # multimodal rotary with a text row in front
            positions = positions[1:]
        rotary = {}  # layer type -> (cos, sin): each type rotates with its own base (Gemma 3)
        for idx, kind in enumerate(adapter.layer_types()):
            rotary.setdefault(kind, adapter.rotary_for(idx)(hidden, position_ids=positions))
        for layer, kind, vision_tokens in zip(adapter.decoder_layers, adapter.layer_types(), tokens_per_layer):
            length = inputs["input_ids"].shape[1] - (num_vision - vision_tokens)
            hidden, (cos, sin) = hidden[:, -length:], rotary[kind]
            hidden = layer(hidden, attention_mask=None, position_embeddings=(cos[:, -length:], sin[:, -length:]))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        raise _Stop(model.lm_head(lm.norm(hidden[:, -1:])))

    handle = lm.register_forward_pre_hook(run_layers, with_kwargs=True)
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    except _Stop as stop:
        return stop.logits
    finally:
        handle.remove()
    raise RuntimeError("the language model never ran")


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_times(variants: dict[Any, Callable[[], object]], repetitions: int,
                      time_fn: Callable[[Callable[[], object]], float] = time_once, warmup: int = 1
                      ) -> dict[Any, list[float]]:
    """Each variant's seconds over ``repetitions`` rounds, every round running all variants in turn (so a slow
    spell of the machine touches them alike), after ``warmup`` untimed rounds. ``time_fn``: how one call is
    timed (``time_once``: wall time; ``research.gpu_check``: CUDA events)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[Any, list[float]] = {v: [] for v in variants}
    for _ in range(repetitions):
        for variant, fn in variants.items():
            times[variant].append(time_fn(fn))
    return times


def run(repetitions: int = 7, threads: int = 1, family: str = "llava15",
        image_tokens: Sequence[int] | None = None) -> dict:
    """Time every variant ``repetitions`` times, interleaved; return medians and ratios. ``image_tokens``: the
    counts the scorers that prune before the LLM are timed at (:func:`interface_section`)."""
    torch.set_num_threads(threads)
    model = bench_model(family)
    inputs = bench_inputs(model, family)
    adapter = adapter_for(model)
    num_layers = adapter.num_layers
    num_vision = int((inputs["input_ids"] == adapter.image_token_id).sum())
    llm_scorers = [n for n in SCORERS.names() if not SCORERS.get(n).pre_llm]

    scoring: dict[str, list[float]] = {}
    in_hooks: dict[str, list[float]] = {}

    def forward(variant: str, engine_args: dict | None = None) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                if engine_args is None:
                    return model(**inputs, use_cache=False, logits_to_keep=1)
                with PruningEngine(model, **engine_args) as engine:
                    model(**inputs, use_cache=False, logits_to_keep=1)
                scoring.setdefault(variant, []).append(engine.last.scoring_seconds)
                in_hooks.setdefault(variant, []).append(engine.last.hook_seconds)

        return call

    full = PruningPlan.of(LOCATIONS, [num_vision] * len(LOCATIONS))
    variants: dict[str, Callable[[], object]] = {
        "vanilla": forward("vanilla"),
        "hooks_full_budget": forward("hooks_full_budget", {"scorer": SCORERS.get("text_prior")(), "plan": full}),
    }
    budgets = {}
    for budget in BUDGETS:
        budgets[budget] = solved = solve_budget(LOCATIONS, num_layers, num_vision, budget)
        plan = solved.plan()
        for scorer in llm_scorers:
            name = f"{scorer}@{budget}"
            variants[name] = forward(name, {"scorer": SCORERS.get(scorer)(), "plan": plan})
        variants[f"ceiling@{budget}"] = (
            lambda p=plan: ceiling_forward(adapter, inputs, p.tokens_per_layer(num_layers, num_vision))
        )

    tower_merging = [n for n in SCORERS.names() if SCORERS.get(n).needs_vision_merging]
    if tower_merging and FAMILIES.get(family).supports_vision_merging:
        variants.update(tower_merge_variants(family, tower_merging, scoring))

    for fn in variants.values():  # warm-up
        fn()
    scoring.clear()  # drop the warm-up's figures
    in_hooks.clear()
    times: dict[str, list[float]] = interleaved_times(variants, repetitions, warmup=0)

    vanilla = statistics.median(times["vanilla"])
    rows = {}
    for variant, samples in times.items():
        if variant.startswith("deep_tower:"):
            continue  # another model: summarised against its own vanilla (tower_merge_summary)
        median = statistics.median(samples)
        scored = scoring.get(variant)
        rows[variant] = {
            "median_ms": 1000 * median,
            "speedup": vanilla / median,
            "scoring_fraction_of_vanilla": statistics.median(scored) / vanilla if scored else None,
        }
    ours, ceiling = rows["text_prior@64"], rows["ceiling@64"]
    paired = [h / v for h, v in zip(times["hooks_full_budget"], times["vanilla"])]
    summary = {
        "speedup": ours["speedup"],
        "ceiling_speedup": ceiling["speedup"],
        "efficiency": ours["speedup"] / ceiling["speedup"],
        # time spent inside the hooks at full budget, measured directly (precise), as a fraction of vanilla
        "hook_overhead": statistics.median(in_hooks["hooks_full_budget"]) / vanilla,
        # the same, end to end: median over repetitions of (hooked / vanilla) - 1 (as noisy as the machine)
        "hook_overhead_end_to_end": statistics.median(paired) - 1,
        "scoring_overhead": ours["scoring_fraction_of_vanilla"],
    }
    if "deep_tower:vanilla" in times:
        summary_tower = tower_merge_summary(times, scoring)
    else:
        summary_tower = {}
    interface = interface_section(family, image_tokens, repetitions)
    return {
        "skipped": interface["skipped"],
        "vision_tower_merging": summary_tower,
        "before_llm": interface,
        "setup": {
            "family": family, "model_class": type(model).__name__, "image_tokens": num_vision,
            "threads": threads, "repetitions": repetitions, "locations": LOCATIONS,
            "keep": {b: list(s.keep) for b, s in budgets.items()},
            "sequence_length": int(inputs["input_ids"].shape[1]), "num_layers": num_layers,
        },
        "variants": rows,
        "text_prior@64": summary,
    }


def tower_merge_variants(family: str, scorers: list[str], scoring: dict) -> dict[str, Callable[[], object]]:
    """Prefill of the deep-tower twin, vanilla and with each tower-merging scorer at each budget, and its
    tower alone (``get_image_features``), unmerged and merged."""
    model = deep_tower_model(family)
    inputs = bench_inputs(model, family)
    pixels = inputs["pixel_values"]

    def prefill(variant: str, scorer: str | None, budget: int) -> Callable[[], object]:
        if scorer is None:
            return prefill_call(model, inputs)
        return prefill_call(model, inputs, SCORERS.get(scorer)(), PruningPlan.of([-1], [budget]),
                            lambda last: scoring.setdefault(variant, []).append(last.scoring_seconds))

    def tower(scorer: str | None, budget: int) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                if scorer is None:
                    return model.model.get_image_features(pixel_values=pixels)
                with PruningEngine(model, SCORERS.get(scorer)(), PruningPlan.of([-1], [budget])):
                    return model.model.get_image_features(pixel_values=pixels)

        return call

    variants = {"deep_tower:vanilla": prefill("deep_tower:vanilla", None, 0),
                "deep_tower:tower": tower(None, 0)}
    for scorer in scorers:
        for budget in BUDGETS:
            variants[f"deep_tower:{scorer}@{budget}"] = prefill(f"deep_tower:{scorer}@{budget}", scorer, budget)
            variants[f"deep_tower:tower:{scorer}@{budget}"] = tower(scorer, budget)
    return variants


def tower_merge_summary(times: dict[str, list[float]], scoring: dict[str, list[float]]) -> dict:
    """Per tower-merging variant: prefill speed-up over the twin's vanilla, scoring + merging share of that
    vanilla (the engine's timed scoring; the merge itself runs inside the tower's layers and is in the
    speed-up), and the tower's own speed-up."""
    vanilla = statistics.median(times["deep_tower:vanilla"])
    tower = statistics.median(times["deep_tower:tower"])
    out = {}
    for variant in times:
        if not variant.startswith("deep_tower:") or variant.count(":") != 1:
            continue
        if variant in ("deep_tower:vanilla", "deep_tower:tower"):
            continue
        name = variant.split(":", 1)[1]
        out[name] = {
            "prefill_speedup": vanilla / statistics.median(times[variant]),
            "scoring_fraction_of_vanilla": statistics.median(scoring[variant]) / vanilla,
            "tower_speedup": tower / statistics.median(times[f"deep_tower:tower:{name}"]),
            "tower_fraction_of_vanilla_prefill": tower / vanilla,
        }
    return out


def interface_scorers() -> list[str]:
    """The scorers that prune once at the interface (location -1); those merging inside the tower excluded."""
    return [n for n in SCORERS.names() if SCORERS.get(n).pre_llm and not SCORERS.get(n).needs_vision_merging]


def refused_scorers(family: str) -> dict[str, str]:
    """The scorers before the LLM that ``family`` cannot run, each with the sweep's one-line reason (the registry's
    check, ``research.models.registry.check_scorers``): they are listed as not timed instead of failing the bench."""
    adapter, refused = FAMILIES.get(family), {}
    for name in interface_scorers():
        entry = SimpleNamespace(name=name, component=SCORERS.get(name), positions="original")  # as a ScorerSpec
        try:
            check_scorers(adapter, [entry])
        except UnsupportedModel as error:
            refused[name] = str(error)
    return refused


def bench_clip(directory: Path, vision_config: object) -> Path:
    """Save a random-weight CLIP (``CLIP_TEXT`` text tower, ``vision_config``'s width) and the offline word
    tokenizer to ``directory``: the ``clip_path`` of the scorers that embed the question with CLIP."""
    from transformers import AutoConfig, AutoModel

    from research.shapes_model.vocab import build_tokenizer

    tokenizer = build_tokenizer()
    text = dict(CLIP_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    config = AutoConfig.for_model("clip", text_config=text, vision_config=vision_config.to_dict(),
                                  projection_dim=CLIP_TEXT["hidden_size"])
    AutoModel.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_scorer(name: str, clip_path: Path | None) -> object:
    """The registered scorer ``name``, given ``clip_path`` if it takes one."""
    scorer = SCORERS.get(name)
    takes_clip = dataclasses.is_dataclass(scorer) and "clip_path" in {f.name for f in dataclasses.fields(scorer)}
    return scorer(clip_path=str(clip_path)) if takes_clip and clip_path else scorer()


def interface_section(family: str = "llava15", image_tokens: Sequence[int] | None = None, repetitions: int = 7,
                      num_layers: int | None = None) -> dict:
    """Vanilla prefill and every scorer that prunes before the LLM, at each image-token count, interleaved.

    ``image_tokens``: square CLIP grids (``grid_model``; default ``GROWTH_IMAGE_TOKENS`` for llava15, the
    family's own count otherwise); at ``n`` tokens each of ``BUDGETS`` keeps ``round(budget * n / 576)`` tokens.
    A CLIP (``bench_clip``) is given to the scorers that need one where the tower is CLIP's; one that still
    cannot run is listed in ``skipped``. ``growth``: per scorer, the last count's figures over the first's.
    """
    if image_tokens is None and family in GRID_FAMILIES:
        image_tokens = GROWTH_IMAGE_TOKENS
    models = [grid_model(family, n, num_layers) for n in image_tokens] if image_tokens else [bench_model(family)]
    refused = refused_scorers(family)
    scoring: dict[tuple[int, str], list[float]] = {}
    variants: dict[tuple[int, str], Callable[[], object]] = {}
    keep: dict[tuple[int, str], int] = {}
    with tempfile.TemporaryDirectory() as directory:
        vision_config = models[0].config.vision_config
        clip = bench_clip(Path(directory), vision_config) if vision_config.model_type == "clip_vision_model" else None
        for model in models:
            inputs = bench_inputs(model, family)
            count = int((inputs["input_ids"] == model.config.image_token_id).sum())
            variants[count, "vanilla"] = prefill_call(model, inputs)
            for budget in BUDGETS:
                for name in (n for n in interface_scorers() if n not in refused):
                    variant = (count, f"{name}@{budget}")
                    keep[variant], scoring[variant] = round(budget * count / BASE_IMAGE_TOKENS), []
                    record = scoring[variant].append
                    variants[variant] = prefill_call(model, inputs, make_scorer(name, clip),
                                                     PruningPlan.of([-1], [keep[variant]]),
                                                     lambda last, record=record: record(last.scoring_seconds))
        skipped = dict(refused)
        for variant, fn in list(variants.items()):  # warm-up
            try:
                fn()
            except (ValueError, OSError) as error:  # e.g. a CLIP-text scorer on a family whose tower is not CLIP's
                skipped[f"{variant[1]} ({variant[0]} image tokens)"] = str(error).splitlines()[0]
                del variants[variant]
        for samples in scoring.values():
            samples.clear()  # drop the warm-up's figures
        times = interleaved_times(variants, repetitions, warmup=0)
    return interface_summary(times, scoring, keep) | {"skipped": skipped}


def prefill_call(model: nn.Module, inputs: dict, scorer: object | None = None, plan: PruningPlan | None = None,
                 record: Callable[[Any], None] | None = None) -> Callable[[], object]:
    """One prefill (no cache, the last position's logits) as a call to time: vanilla when ``scorer`` is None, else
    ``scorer`` pruning by ``plan``, then ``record(engine.last)`` (e.g. to keep its scoring or hook seconds)."""
    def call() -> object:
        with torch.no_grad():
            if scorer is None:
                return model(**inputs, use_cache=False, logits_to_keep=1)
            with PruningEngine(model, scorer, plan) as engine:
                out = model(**inputs, use_cache=False, logits_to_keep=1)
            if record is not None:
                record(engine.last)
            return out

    return call


def interface_summary(times: dict[tuple[int, str], list[float]], scoring: dict[tuple[int, str], list[float]],
                      keep: dict[tuple[int, str], int]) -> dict:
    """Per count: vanilla's median and each variant's speed-up and scoring share of that vanilla; per variant
    timed at two counts or more, ``growth`` from the first count to the last (share ratio, scoring-time ratio)."""
    counts = sorted({count for count, _ in times})
    vanilla = {n: statistics.median(times[n, "vanilla"]) for n in counts}
    rows: dict[int, dict] = {n: {} for n in counts}
    for (count, name), samples in times.items():
        if name == "vanilla":
            continue
        scored = statistics.median(scoring[count, name])
        rows[count][name] = {"keep": keep[count, name], "median_ms": 1000 * statistics.median(samples),
                             "speedup": vanilla[count] / statistics.median(samples), "scoring_ms": 1000 * scored,
                             "scoring_fraction_of_vanilla": scored / vanilla[count]}
    growth = {}
    first, last = counts[0], counts[-1]
    for name in rows[first]:
        if last == first or name not in rows[last]:
            continue
        low, high = rows[first][name], rows[last][name]
        growth[name] = {
            "image_tokens": [first, last], "keep": [low["keep"], high["keep"]],
            "scoring_fraction_of_vanilla": [low["scoring_fraction_of_vanilla"], high["scoring_fraction_of_vanilla"]],
            "share_growth": high["scoring_fraction_of_vanilla"] / low["scoring_fraction_of_vanilla"],
            "scoring_time_growth": high["scoring_ms"] / low["scoring_ms"],
        }
    return {"image_tokens": counts, "vanilla_ms": {n: 1000 * v for n, v in vanilla.items()}, "variants": rows,
            "growth": growth}


def format_report(result: dict) -> str:
    lines = [f"{'variant':<22}{'median ms':>11}{'speed-up':>10}{'scoring/vanilla':>17}"]
    for variant, row in result["variants"].items():
        scoring = row["scoring_fraction_of_vanilla"]
        lines.append(
            f"{variant:<22}{row['median_ms']:>11.1f}{row['speedup']:>9.2f}x"
            f"{'' if scoring is None else f'{100 * scoring:.2f}%':>17}"
        )
    s = result["text_prior@64"]
    lines.append(
        f"text_prior@64: speed-up {s['speedup']:.2f}x, ceiling {s['ceiling_speedup']:.2f}x, "
        f"efficiency {s['efficiency']:.3f}, scoring {100 * s['scoring_overhead']:.2f}% of vanilla prefill\n"
        f"hooks at full budget: {100 * s['hook_overhead']:.3f}% of vanilla prefill spent inside them, "
        f"{100 * s['hook_overhead_end_to_end']:+.2f}% end to end (paired median; machine noise is larger)"
    )
    lines += format_interface(result["before_llm"]) if "before_llm" in result else []
    for variant, reason in result.get("skipped", {}).items():
        lines.append(f"{variant}: not timed ({reason})")
    for name, row in result.get("vision_tower_merging", {}).items():
        lines.append(f"{name} (24-layer tower twin): prefill speed-up {row['prefill_speedup']:.2f}x, scoring "
                     f"{100 * row['scoring_fraction_of_vanilla']:.2f}% of vanilla prefill, tower speed-up "
                     f"{row['tower_speedup']:.2f}x (the tower is {100 * row['tower_fraction_of_vanilla_prefill']:.1f}% "
                     "of vanilla prefill)")
    return "\n".join(lines)


def format_interface(section: dict) -> list[str]:
    """The scorers before the LLM: per count, keep / speed-up / scoring share; then the growth per scorer."""
    counts, vanilla = section["image_tokens"], section["vanilla_ms"]
    lines = ["before the LLM (keeping the same shares of the image tokens), vanilla prefill "
             + ", ".join(f"{vanilla[n]:.0f} ms at {n} image tokens" for n in counts)]
    for name in section["variants"][counts[0]]:
        cells = []
        for n in counts:
            row = section["variants"][n].get(name)
            if row:
                cells.append(f"{n}: keep {row['keep']}, {row['speedup']:.2f}x, scoring {row['scoring_ms']:.1f} ms "
                             f"= {100 * row['scoring_fraction_of_vanilla']:.2f}%")
        growth = section["growth"].get(name)
        if growth:
            cells.append(f"growth: share {growth['share_growth']:.2f}x, time {growth['scoring_time_growth']:.2f}x")
        lines.append(f"  {name:<16}" + "; ".join(cells))
    return lines


def image_token_counts(text: str) -> list[int]:
    """``576,2916`` -> [576, 2916]; a clear error for anything else."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"image tokens {text!r}: give comma-separated integers, e.g. 576,2916") from None
    try:
        for count in counts:
            grid_side(count)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava15", choices=FAMILIES.names(), help="model family to measure")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noisy)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--image-tokens", type=image_token_counts, default=None,
                        help="image-token counts (square CLIP grids) the scorers before the LLM are timed at, e.g. "
                             f"576,2916 (default for {sorted(GRID_FAMILIES)}: "
                             f"{','.join(map(str, GROWTH_IMAGE_TOKENS))}; other families: their own count only)")
    args = parser.parse_args(argv)
    if args.image_tokens and args.family not in GRID_FAMILIES:
        parser.error(f"--image-tokens needs a square-grid family; {args.family!r} is not one: choose one of "
                     f"{sorted(GRID_FAMILIES)}")
    result = run(args.repetitions, args.threads, args.family, args.image_tokens)
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
