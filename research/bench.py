"""Prefill latency benchmark: ``python -m research.bench [--family F] [--json PATH]``.

A mid-size random-weight model of the family (default ``llava15``; text hidden 1024, 16 layers, about
576 image tokens, ~40 question tokens; built by ``research.models.testing.random_model(family, "mid")``) is timed
on CPU prefill:

* vanilla;
* the engine installed at full budget (hooks only: their overhead);
* every registered LLM scorer at average budgets 192 and 64, pruning after layers [1, 8];
* every scorer that prunes once before the LLM (``pre_llm``) keeping 192 and 64 image tokens at the interface
  (one that needs what the random model lacks, a CLIP text tower, is listed as not timed, with why);
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
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from research.models import FAMILIES, UnsupportedModel, VLMAdapter, adapter_for
from research.models.registry import check_scorers
from research.models.testing import random_inputs, random_model
from research.pruning import PruningEngine, PruningPlan
from schedules import solve_budget
from scorers import SCORERS

LOCATIONS = [1, 8]  # [2, 8] cannot reach an average of 64 in 16 layers (layers 0-1 count 576)
BUDGETS = [192, 64]
# image size (pixels) giving about 576 image tokens, for the families whose image sets the count
IMAGE_SIZES = {"qwen2_vl": (672, 672), "qwen2_5_vl": (672, 672), "llava_next": (112, 112),
               "llava_onevision": (112, 112)}


def bench_model(family: str = "llava15") -> nn.Module:
    """The family's mid-size random-weight model (16 layers, hidden 1024)."""
    return random_model(family, size="mid", seed=0)


def deep_tower_model(family: str = "llava15", tower_layers: int = 24) -> nn.Module:
    """The family's mid model with a ``tower_layers``-deep vision tower (CLIP ViT-L's depth), for the scorers
    that merge inside it."""
    from research.models.testing import random_config

    config = random_config(family, "mid")
    config.vision_config.num_hidden_layers = tower_layers
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
            positions = torch.arange(hidden.shape[1])[None]
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


def run(repetitions: int = 7, threads: int = 1, family: str = "llava15") -> dict:
    """Time every variant ``repetitions`` times, interleaved; return medians and ratios."""
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

    # scorers that prune once at the interface (location -1), keeping the budget from the image tokens the LLM gets
    interface_scorers = [n for n in SCORERS.names() if SCORERS.get(n).pre_llm
                         and not SCORERS.get(n).needs_vision_merging]
    skipped = {}
    for scorer in list(interface_scorers):  # one the family refuses (CLS saliency, CLIP patches) is not timed
        try:
            check_scorers(FAMILIES.get(family), [SimpleNamespace(component=SCORERS.get(scorer), name=scorer,
                                                                 positions="original")])
        except UnsupportedModel as error:
            interface_scorers.remove(scorer)
            skipped.update({f"{scorer}@{budget}": str(error) for budget in BUDGETS})
    for budget in BUDGETS:
        for scorer in interface_scorers:
            name = f"{scorer}@{budget}"
            variants[name] = forward(name, {"scorer": SCORERS.get(scorer)(), "plan": PruningPlan.of([-1], [budget])})

    tower_merging = [n for n in SCORERS.names() if SCORERS.get(n).needs_vision_merging]
    if tower_merging and FAMILIES.get(family).supports_vision_merging:
        variants.update(tower_merge_variants(family, tower_merging, scoring))

    for variant, fn in list(variants.items()):  # warm-up
        try:
            fn()
        except (ValueError, OSError) as error:  # e.g. a scorer that needs a CLIP text tower the random model lacks
            if variant.split("@")[0] not in interface_scorers:
                raise
            skipped[variant] = str(error).splitlines()[0]
            del variants[variant]
    times: dict[str, list[float]] = {v: [] for v in variants}
    scoring.clear()  # drop the warm-up's figures
    in_hooks.clear()
    for _ in range(repetitions):
        for variant, fn in variants.items():
            times[variant].append(time_once(fn))

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
    return {
        "skipped": skipped,
        "vision_tower_merging": summary_tower,
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
        def call() -> object:
            with torch.no_grad():
                if scorer is None:
                    return model(**inputs, use_cache=False, logits_to_keep=1)
                with PruningEngine(model, SCORERS.get(scorer)(), PruningPlan.of([-1], [budget])) as engine:
                    model(**inputs, use_cache=False, logits_to_keep=1)
                scoring.setdefault(variant, []).append(engine.last.scoring_seconds)

        return call

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
    for variant, reason in result.get("skipped", {}).items():
        lines.append(f"{variant}: not timed ({reason})")
    for name, row in result.get("vision_tower_merging", {}).items():
        lines.append(f"{name} (24-layer tower twin): prefill speed-up {row['prefill_speedup']:.2f}x, scoring "
                     f"{100 * row['scoring_fraction_of_vanilla']:.2f}% of vanilla prefill, tower speed-up "
                     f"{row['tower_speedup']:.2f}x (the tower is {100 * row['tower_fraction_of_vanilla_prefill']:.1f}% "
                     "of vanilla prefill)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava15", choices=FAMILIES.names(), help="model family to measure")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noisy)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = run(args.repetitions, args.threads, args.family)
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
