"""Where each scorer's kept image tokens lie: ``python -m research.shapes_model.grounding [--model DIR]``.

For every scorer and every single pruning layer ``l`` (prune once, after decoder layer ``l``, keeping
``keep`` of the 144 image tokens), on the first ``samples`` test samples:

- ``recall``: kept relevant patches / relevant patches (the question's relevant cells, ``Sample.relevant``),
  averaged over samples;
- ``on_object``: share of the kept tokens that lie on an object (``Sample.objects_mask``), averaged.

``--tokens`` explains ``text_prior``'s figure from transformers' own attention weights (eager attention):
per layer, the share of AdaptInfer's text-to-text prior (Eq. 2) that each question token holds and the
recall of the top ``keep`` patches of that token's own attention (``token_profile``).

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
from research.models.registry import shapes_path
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


@torch.no_grad()
def token_profile(path: Path, samples: int = GROUNDING_SAMPLES, keep: int = GROUNDING_KEEP,
                  positions: Sequence[int] = (0, 1, 2, -3, -2, -1)) -> dict:
    """Per layer, from the model's own attention weights (head mean), over the question tokens ``t``:

    - ``text_prior``: recall of ``top-keep(w^T A_t2v)`` with ``w = sum_i A_t2t[i, :]`` (Eq. 2-3), which must
      equal ``measure``'s engine figure;
    - ``prior_share[j]``: ``w[t_j] / sum(w)`` at question-token position ``positions[j]`` (-1 = ``ASSISTANT:``);
    - ``token_recall[j]``: recall of the top ``keep`` patches of that token's own attention row.

    Returns {"positions", "layers", "text_prior": [L], "prior_share": [L][J], "token_recall": [L][J]}.
    """
    adapter, processor = LlavaAdapter.from_pretrained(path, attn_implementation="eager")
    data = list(ShapesVQA("test", size=samples))
    inputs = adapter.build_inputs(processor, [ShapesVQA.pil_image(s) for s in data], [s.question for s in data])
    attentions = adapter.model(**inputs, output_attentions=True, logits_to_keep=1).attentions  # L x [B, H, S, S]
    is_image = inputs["input_ids"] == adapter.image_token_id  # [B, S]
    relevant = [torch.from_numpy(s.relevant.reshape(-1)) for s in data]  # B x [144] bool

    def recall(scores: torch.Tensor, row: int) -> float:  # scores [144]
        return float(relevant[row][scores.topk(keep).indices].sum() / relevant[row].sum())

    result: dict = {"positions": list(positions), "layers": list(range(adapter.num_layers - 1)),
                    "text_prior": [], "prior_share": [], "token_recall": []}
    for layer in result["layers"]:
        attention = attentions[layer].float().mean(1)  # [B, S, S]
        prior_recall, shares, token_recalls = [], [], []
        for row in range(len(data)):
            vision = is_image[row].nonzero()[:, 0]  # [V]
            text = torch.arange(int(vision.max()) + 1, is_image.shape[1])  # [T] question tokens (right of the image)
            t2v, t2t = attention[row][text][:, vision], attention[row][text][:, text]  # [T, V], [T, T]
            prior = t2t.sum(0)  # [T] Eq. 2
            prior_recall.append(recall(prior @ t2v, row))
            shares.append([float(prior[j] / prior.sum()) for j in positions])
            token_recalls.append([recall(t2v[j], row) for j in positions])
        result["text_prior"].append(float(np.mean(prior_recall)))
        result["prior_share"].append(np.mean(shares, 0).tolist())
        result["token_recall"].append(np.mean(token_recalls, 0).tolist())
    return result


def token_table(profile: dict) -> list[str]:
    """Markdown rows: per layer, text_prior recall, then prior share / own recall at each question position."""
    names = ["last token" if j == -1 else f"token {j}" for j in profile["positions"]]
    lines = ["| after layer | text_prior recall | " + " | ".join(f"{n} (prior share / recall)" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for i, layer in enumerate(profile["layers"]):
        cells = [f"{s:.2f} / {r:.2f}" for s, r in zip(profile["prior_share"][i], profile["token_recall"][i])]
        lines.append(f"| {layer} | {profile['text_prior'][i]:.2f} | " + " | ".join(cells) + " |")
    return lines


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
    parser = argparse.ArgumentParser(description="Grounding of each scorer's kept tokens on the shapes model.")
    parser.add_argument("--model", type=Path, default=shapes_path())
    parser.add_argument("--samples", type=int, default=GROUNDING_SAMPLES)
    parser.add_argument("--keep", type=int, default=GROUNDING_KEEP)
    parser.add_argument("--write", action="store_true", help="store the result in the model's metrics.json")
    parser.add_argument("--tokens", action="store_true", help="text_prior's prior share and recall per question token")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.tokens:
        print("\n".join(token_table(token_profile(args.model, args.samples, args.keep))))
        return
    result = measure(args.model, args.samples, args.keep)
    print("\n".join(table(result)))
    if args.write:
        metrics_file = args.model / "metrics.json"
        metrics = json.loads(metrics_file.read_text())
        metrics["grounding"] = result
        metrics_file.write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
