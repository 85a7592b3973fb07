"""``python -m research.run experiment=NAME key=value ...``: every combination of an experiment.

``main(argv)`` only parses; ``run(cfg)`` does the work (and is what tests call). Results go to
``<output_dir>/<experiment>/``: ``summary.csv``, ``summary.md``, ``config.yaml``, ``predictions/``
(JSONL per combination), ``results/`` (JSON per combination: what a re-run reuses) and
``tensorboard/`` (one run directory per combination; ``tensorboard --logdir runs/``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from research.config import ConfigError, RunConfig, load_config, model_directory, model_shape
from research.sweep import Combination, needs_calibration, plan_sweep

SUMMARY_COLUMNS = [
    "scorer", "schedule", "layers", "budget", "keep", "positions", "accuracy", "accuracy_ratio", "prefill_ms",
    "prefill_p90_ms", "decode_ms_per_token", "scoring_ms", "peak_memory_mb", "gflops", "flops_ratio", "avg_tokens",
    "computed_avg_tokens", "status", "error",
]
TIMING_COLUMNS = {"prefill_ms", "prefill_p90_ms", "decode_ms_per_token", "scoring_ms", "peak_memory_mb"}


def fingerprint(cfg: RunConfig) -> str:
    """What a finished combination's result depends on besides the combination itself."""
    keys = {"model": cfg.model, "data": cfg.data, "eval": cfg.eval, "seed": cfg.seed, "positions": cfg.positions,
            "counting": cfg.counting}
    return hashlib.sha256(json.dumps(OmegaConf.to_container(OmegaConf.structured(keys)), sort_keys=True).encode()
                          ).hexdigest()[:16]


def scorer_settings(combo: Combination) -> dict:
    """The combination's scorer parameters with the scorer's defaults filled in (JSON values)."""
    if combo.is_vanilla:
        return {}
    scorer = combo.make_scorer()
    if dataclasses.is_dataclass(scorer):
        values = {f.name: getattr(scorer, f.name) for f in dataclasses.fields(scorer) if f.init}
    else:
        values = dict(combo.scorer_params)
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def reusable(previous: dict | None, key: str, combo: Combination) -> bool:
    """A finished result can stand for this combination: same run fingerprint and same scorer settings,
    defaults included (a default changed in the code, e.g. pdrop's attention, re-runs the combination)."""
    return (previous is not None and previous.get("status") == "ok" and previous.get("fingerprint") == key
            and previous.get("scorer_settings") == scorer_settings(combo))


def run(cfg: RunConfig) -> list[dict]:
    """Run (or resume) every combination; return the summary rows (vanilla first)."""
    from research.data import DATASETS
    from research.data.shapes import accuracy
    from research.models import LlavaAdapter
    from research.report.figures import accuracy_vs_budget

    directory = model_directory(cfg)
    num_layers, num_vision = model_shape(directory)
    out = Path(cfg.output_dir) / cfg.experiment
    histograms = cached_histograms(cfg, directory)
    plan_sweep(cfg, num_layers, num_vision, histograms, allow_pending=True)  # every check before the model loads
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), out / "config.yaml")
    key = fingerprint(cfg)

    L.seed_everything(cfg.seed, verbose=False)
    dtype = getattr(torch, cfg.model.dtype)
    adapter, processor = LlavaAdapter.from_pretrained(
        directory, dtype=dtype, attn_implementation=cfg.model.attn_implementation,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    dataset = DATASETS.get(cfg.data.name)(split=cfg.data.split, size=cfg.data.limit)
    samples = list(dataset)
    metric = getattr(dataset, "metric", accuracy)
    if cfg.analysis is not None:
        from research.analysis.collect import run_analysis

        result = run_analysis(cfg.analysis, adapter, processor, samples, out, cfg.eval.batch_size)
        if "changepoint_layers" in result:
            print(f"changepoint schedule derived from {result['samples']} samples: layers "
                  f"{result['changepoint_layers']} (histogram {result['histogram']})")
        return [result]
    histograms.update(calibrate(cfg, directory, adapter, processor, histograms, out))
    combos = plan_sweep(cfg, num_layers, num_vision, histograms)

    results: dict[str, dict] = {}
    vanilla_accuracy = None
    for combo in combos:
        result_file = out / "results" / f"{combo.name}.json"
        previous = json.loads(result_file.read_text()) if result_file.is_file() else None
        if combo.error:
            logging.getLogger(__name__).error("combination %s not run: %s", combo.name, combo.error)
            results[combo.name] = {"combination": combo.__dict__, "fingerprint": key, "status": "failed",
                                   "error": combo.error}
        elif reusable(previous, key, combo):
            results[combo.name] = previous
        else:
            results[combo.name] = _run_combination(
                cfg, combo, adapter, processor, samples, metric, vanilla_accuracy, num_vision, out, key
            )
            result_file.parent.mkdir(exist_ok=True)
            result_file.write_text(json.dumps(results[combo.name], indent=2))
        if combo.is_vanilla and results[combo.name]["status"] == "ok":
            vanilla_accuracy = results[combo.name]["accuracy"]

    rows = summarise(combos, results)
    write_summary(out, rows)
    _log_budget_figure(out, rows, accuracy_vs_budget)
    return rows


def cached_histograms(cfg: RunConfig, directory: Path) -> dict[int, list[int]]:
    """Shift histograms of changepoint entries already calibrated on this model, dataset and N."""
    from research.analysis.collect import shift_cache_file

    found = {}
    for index, samples in needs_calibration(cfg):
        path = shift_cache_file(Path(cfg.output_dir) / ".cache", directory, cfg.data.name, cfg.data.split, samples)
        if path.is_file():
            found[index] = json.loads(path.read_text())["histogram"]
    return found


def calibrate(cfg: RunConfig, directory: Path, adapter: Any, processor: Any, known: dict[int, list[int]],
              out: Path) -> dict[int, list[int]]:
    """Derive (and cache, and log) the shift histogram of every changepoint entry not cached yet."""
    from torch.utils.tensorboard import SummaryWriter

    from research.analysis.collect import attention_shift_histogram, log_shift_histogram, shift_cache_file
    from research.data import DATASETS
    from schedules.changepoint import changepoint_layers

    derived = {}
    for index, samples in needs_calibration(cfg):
        path = shift_cache_file(Path(cfg.output_dir) / ".cache", directory, cfg.data.name, cfg.data.split, samples)
        if index in known:
            histogram = known[index]
            print(f"changepoint schedule: reusing the calibration cached in {path}")
        else:
            calibration = list(DATASETS.get(cfg.data.name)(split=cfg.data.split, size=samples))
            histogram = attention_shift_histogram(adapter, processor, calibration, cfg.eval.batch_size).tolist()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"histogram": histogram, "samples": samples, "model": str(directory),
                                        "data": [cfg.data.name, cfg.data.split]}))
        derived[index] = histogram
        layers = changepoint_layers(histogram)
        print(f"changepoint schedule derived from {samples} samples: prune after layers {layers}")
        with SummaryWriter(out / "tensorboard" / "calibration") as writer:
            log_shift_histogram(writer, np.asarray(histogram), layers, f"changepoint_{index}")
    return derived


def _run_combination(
    cfg: RunConfig, combo: Combination, adapter: Any, processor: Any, samples: list, metric: Any,
    vanilla_accuracy: float | None, num_vision: int, out: Path, key: str,
) -> dict:
    """One combination in its own Lightning predict loop; any error is recorded, not raised."""
    from research.evaluation import JsonlPredictionWriter, SweepModule, TensorBoardReport

    record: dict[str, Any] = {"combination": combo.__dict__, "fingerprint": key,
                              "scorer_settings": scorer_settings(combo)}
    try:
        module = SweepModule(adapter, processor, combo, combo.positions, cfg.eval.max_new_tokens, num_vision)
        report = TensorBoardReport(
            metric, vanilla_accuracy, samples[: cfg.eval.latency_samples], samples[: cfg.eval.overlays],
            cfg.eval.decode_tokens,
        )
        writer = JsonlPredictionWriter(out / "predictions" / f"{combo.name}.jsonl", metric)
        logger = TensorBoardLogger(save_dir=out, name="tensorboard", version=combo.name, default_hp_metric=False)
        trainer = L.Trainer(
            accelerator="auto", devices=1, logger=logger, callbacks=[writer, report],
            enable_checkpointing=False, enable_model_summary=False,
        )
        loader = DataLoader(samples, batch_size=cfg.eval.batch_size, collate_fn=list)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            trainer.predict(module, loader, return_predictions=False)
        return {**record, **module.metrics, "status": "ok", "error": ""}
    except Exception as error:  # one combination failing must not stop the sweep
        logging.getLogger(__name__).error("combination %s failed:\n%s", combo.name, traceback.format_exc())
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        return {**record, "status": "failed", "error": message}


def summarise(combos: list[Combination], results: dict[str, dict]) -> list[dict]:
    vanilla = results.get("vanilla", {})
    rows = []
    for combo in combos:
        r = results[combo.name]
        ok = r["status"] == "ok"
        row = {
            "scorer": combo.scorer_label, "schedule": combo.schedule,
            "layers": " ".join(map(str, combo.locations)) or "-",
            "budget": combo.budget if combo.budget is not None else "all",
            "keep": " ".join(map(str, combo.keep)) or "-",
            "positions": "-" if combo.is_vanilla else combo.positions,
            "avg_tokens": "" if combo.error else round(combo.reported_avg, 2),
            "computed_avg_tokens": "" if combo.error else round(combo.computed_avg, 2),
            "status": r["status"], "error": r.get("error", ""),
        }
        for column in ("accuracy", "prefill_ms", "prefill_p90_ms", "decode_ms_per_token", "scoring_ms",
                       "peak_memory_mb", "gflops"):
            row[column] = round(r[column], 4) if ok else ""
        both = ok and vanilla.get("status") == "ok"
        row["accuracy_ratio"] = round(r["accuracy"] / vanilla["accuracy"], 4) if both and vanilla["accuracy"] else ""
        row["flops_ratio"] = round(r["flops"] / vanilla["flops"], 4) if both else ""
        rows.append(row)
    return rows


def write_summary(out: Path, rows: list[dict]) -> None:
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in SUMMARY_COLUMNS if c not in ("prefill_p90_ms", "peak_memory_mb")]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(row[c]) for c in shown) + " |" for row in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _log_budget_figure(out: Path, rows: list[dict], accuracy_vs_budget) -> None:
    """Accuracy vs budget per scorer (for experiments with several budgets), in a ``summary`` run."""
    ok = [r for r in rows if r["status"] == "ok" and r["scorer"] != "vanilla"]
    if len({r["budget"] for r in ok}) < 2:
        return
    from torch.utils.tensorboard import SummaryWriter

    curves: dict[str, list[tuple[float, float]]] = {}
    for r in ok:
        curves.setdefault(f"{r['scorer']} / {r['schedule']}", []).append((float(r["budget"]), float(r["accuracy"])))
    vanilla = next((float(r["accuracy"]) for r in rows if r["scorer"] == "vanilla" and r["status"] == "ok"), None)
    with SummaryWriter(out / "tensorboard" / "summary") as writer:
        writer.add_figure("accuracy_vs_budget", accuracy_vs_budget({k: sorted(v) for k, v in curves.items()}, vanilla))


def quiet_lightning() -> None:
    """Keep the terminal for the progress bar: no device banners, tips or known deprecation noise."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", ".*litlogger.*")


def main(argv: list[str] | None = None) -> int:
    """Parse ``key=value`` arguments and run; a bad value exits 2 with one line, before any model loads."""
    quiet_lightning()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        directory = model_directory(cfg)
        plan_sweep(cfg, *model_shape(directory), cached_histograms(cfg, directory), allow_pending=True)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = run(cfg)
    out = Path(cfg.output_dir) / cfg.experiment
    if cfg.analysis is not None:
        print(f"results in {out}/ (tensorboard --logdir {cfg.output_dir})")
        return 0
    print((out / "summary.md").read_text())
    print(f"results in {out}/ (tensorboard --logdir {cfg.output_dir})")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
