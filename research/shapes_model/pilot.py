"""Short recipe probe: the LLaVA phase alone, on the shipped CLIP tower, then accuracy and grounding.

``python -m research.shapes_model.pilot OUT '{"llava_steps": 300, "question_weight": 1.0, "caption_weight": 1.0}'``
(keys: ``TrainConfig`` fields; 1 thread, so two probes share 2 cores). Writes the LLaVA and
``OUT/pilot.json``: vanilla accuracy on the first 300 test samples, ``text_prior`` / ``pdrop`` grounding
(``research.shapes_model.grounding``) and the training minutes. Probes compare recipes; they are not the
shipped model (the full recipe also retrains the CLIP pair: ``python -m research.train_offline_model``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from transformers import CLIPModel

from research.data.shapes import ShapesVQA
from research.models import LlavaAdapter
from research.shapes_model.evaluate import predict, report
from research.shapes_model.grounding import measure
from research.shapes_model.modeling import ShapesModelConfig, build_llava
from research.shapes_model.train import LlavaPhase, TrainConfig, _fit, llava_batches
from research.shapes_model.vocab import build_processor, build_tokenizer


def probe(out: Path, overrides: dict, samples: int = 300) -> dict:
    from research.train_offline_model import SHIPPED

    cfg = TrainConfig(**{"threads": 1, **overrides})
    torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, verbose=False)
    tok = build_tokenizer()
    llava = build_llava(ShapesModelConfig(), CLIPModel.from_pretrained(SHIPPED / "clip"))
    start = time.perf_counter()
    _fit(LlavaPhase(llava, cfg), llava_batches(cfg, tok), cfg.llava_steps)
    minutes = (time.perf_counter() - start) / 60
    llava.eval().save_pretrained(out)
    build_processor().save_pretrained(out)
    adapter, processor = LlavaAdapter.from_pretrained(out)
    test = list(ShapesVQA("test", size=samples))
    result = {
        "cfg": overrides, "minutes": minutes, "vanilla": report(test, predict(adapter, processor, test)),
        "grounding": measure(out, scorers=("text_prior", "pdrop")),
    }
    (out / "pilot.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]), json.loads(sys.argv[2])), indent=1))
