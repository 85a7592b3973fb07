"""Where each scorer's kept image tokens lie: ``python -m research.shapes_model.grounding [--model DIR]``.

For every scorer and every single pruning layer ``l`` (prune once, after decoder layer ``l``, keeping
``keep`` of the 144 image tokens), on the first ``samples`` test samples:

- ``recall``: kept relevant patches / relevant patches (the question's relevant cells, ``Sample.relevant``),
  averaged over samples;
- ``on_object``: share of the kept tokens that lie on an object (``Sample.objects_mask``), averaged.

An oracle (``oracle_keep``: relevant object patches, then other relevant patches, then other objects) and the
scorers that read no attention give the reference points. Results go to the model's ``metrics.json``
(key ``grounding``) when ``--write`` is given, and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from research.data.shapes import NUM_PATCHES, Sample, ShapesVQA, oracle_keep
from research.models import LlavaAdapter
from research.pruning import PruningEngine, PruningPlan
from scorers import SCORERS

SCORER_NAMES = ("text_prior", "static_prompt", "fastv", "pdrop", "random")
GROUNDING_SAMPLES, GROUNDING_KEEP = 96, 36


def keep_metrics(kept: np.ndarray, samples: Sequence[Sample]) -> dict[str, float]:
    """Mean recall of the relevant patches and mean share of kept tokens on objects; ``kept`` [B, k] patch ids."""
    recall, on_object = [], []
    for row, sample in zip(kept, samples):
        relevant, objects = sample.relevant.reshape(-1), sample.objects_mask.reshape(-1)  # [144] bool each
        recall.append(relevant[row].sum() / relevant.sum())
        on_object.append(objects[row].mean())
    return {"recall": float(np.mean(recall)), "on_object": float(np.mean(on_object))}


@torch.no_grad()
def kept_patches(adapter: LlavaAdapter, processor, samples: Sequence[Sample], scorer_name: str, layer: int,
                 keep: int) -> np.ndarray:
    """[B, keep] patch indices ``scorer_name`` keeps when pruning once after decoder layer ``layer``."""
    inputs = adapter.build_inputs(processor, [ShapesVQA.pil_image(s) for s in samples], [s.question for s in samples])
    first_image = (inputs["input_ids"] == adapter.image_token_id).int().argmax(1, keepdim=True)  # [B, 1]
    with PruningEngine(adapter.model, SCORERS.get(scorer_name)(), PruningPlan.of([layer], [keep]),
                       adapter=adapter) as engine:
        adapter.model(**inputs, logits_to_keep=1)
    return (engine.last.kept[0] - first_image).cpu().numpy()


def measure(path: Path, samples: int = GROUNDING_SAMPLES, keep: int = GROUNDING_KEEP,
            scorers: Sequence[str] = SCORER_NAMES) -> dict:
    """{"samples", "keep", "layers", "oracle": {...}, scorer: {"recall": [per layer], "on_object": [...]}}."""
    adapter, processor = LlavaAdapter.from_pretrained(path)
    data = list(ShapesVQA("test", size=samples))
    layers = list(range(adapter.num_layers - 1))  # pdrop reads layer l + 1
    result: dict = {"samples": samples, "keep": keep, "layers": layers}
    oracle = np.stack([oracle_keep(s.relevant, s.objects_mask, keep / NUM_PATCHES) for s in data])
    result["oracle"] = keep_metrics(oracle, data)
    for name in scorers:
        per_layer = [keep_metrics(kept_patches(adapter, processor, data, name, layer, keep), data) for layer in layers]
        result[name] = {metric: [row[metric] for row in per_layer] for metric in ("recall", "on_object")}
    return result


def table(result: dict) -> list[str]:
    """Markdown rows: recall / on-object share per scorer and layer."""
    layers = result["layers"]
    lines = [
        "| scorer | metric | " + " | ".join(f"after layer {layer}" for layer in layers) + " |",
        "|---|---|" + "---|" * len(layers),
    ]
    for name, values in result.items():
        if isinstance(values, dict) and name != "oracle":
            for metric in ("recall", "on_object"):
                lines.append(f"| {name} | {metric} | " + " | ".join(f"{v:.2f}" for v in values[metric]) + " |")
    oracle = result["oracle"]
    lines.append(f"| oracle | recall / on_object | {oracle['recall']:.2f} / {oracle['on_object']:.2f} (any layer) |"
                 + " |" * (len(layers) - 1))
    return lines


def main(argv: list[str] | None = None) -> None:
    from research.train_offline_model import SHIPPED

    parser = argparse.ArgumentParser(description="Grounding of each scorer's kept tokens on the shapes model.")
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--samples", type=int, default=GROUNDING_SAMPLES)
    parser.add_argument("--keep", type=int, default=GROUNDING_KEEP)
    parser.add_argument("--write", action="store_true", help="store the result in the model's metrics.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = measure(args.model, args.samples, args.keep)
    print("\n".join(table(result)))
    if args.write:
        metrics_file = args.model / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        metrics["grounding"] = result
        metrics_file.write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
