"""Resume: what a finished combination's result depends on (its fingerprint), and why a stale one runs again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from research.config import RunConfig, dataset_names
from research.storage import source_digest
from research.sweep import Combination

if TYPE_CHECKING:
    from research.tasks import Task


def fingerprint(cfg: RunConfig, combo: Combination, weights: str, task: Task | None = None) -> dict[str, str]:
    """Everything a finished combination's result depends on, by part (a re-run names the parts that changed).

    ``config``: model, data (of ``task``, the dataset it ran on), eval, seed, positions, counting;
    ``weights``: the checkpoint (:func:`research.storage.weights_digest`); ``dataset``, ``scorer``,
    ``schedule``: the source files of the classes that ran; ``scorer settings``: its parameters with the
    defaults filled in (a default changed in the code, e.g. pdrop's attention, re-runs the combination).
    """
    from research.data import DATASETS
    from research.data.benchmark import DEFAULT_MAX_NEW_TOKENS
    from schedules import SCHEDULES
    from scorers import SCORERS

    if task is None:  # the first dataset, not opened: its settings as configured (shapes: split test)
        name = dataset_names(cfg)[0]
        data = {"name": name, "split": cfg.data.split or "test", "limit": cfg.data.limit,
                "calibration_split": cfg.data.calibration_split}
        tokens = cfg.eval.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    else:
        name, data, tokens = task.name, task.data_key, task.max_new_tokens
    keys = {"model": cfg.model, "data": data, "eval": {**dataclasses.asdict(cfg.eval), "max_new_tokens": tokens},
            "seed": cfg.seed, "positions": cfg.positions, "counting": cfg.counting}
    config = json.dumps(OmegaConf.to_container(OmegaConf.structured(keys)), sort_keys=True)
    return {
        "config": hashlib.sha256(config.encode()).hexdigest()[:16],
        "weights": weights,
        "dataset": source_digest(DATASETS.get(name)),
        "scorer": "-" if combo.is_vanilla else source_digest(SCORERS.get(combo.scorer)),
        "scorer settings": hashlib.sha256(json.dumps(scorer_settings(combo)).encode()).hexdigest()[:16],
        "schedule": source_digest(SCHEDULES.get(combo.schedule_name)) if combo.schedule_name in SCHEDULES else "-",
    }


def stale_reason(previous: dict | None, key: dict[str, str]) -> str | None:
    """None if ``previous`` is a finished result for ``key``; else why it must be (re)computed."""
    if previous is None:
        return "new"
    if previous.get("status") != "ok":
        return "failed before"
    old = previous.get("fingerprint")
    if not isinstance(old, dict):
        return "written by an older version"
    changed = [part for part in key if old.get(part) != key[part]]
    return f"{', '.join(changed)} changed" if changed else None


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


def resume_line(stale: dict[str, str | None]) -> str:
    """One line: how many combinations are reused, how many run, and why each stale one runs again."""
    reused = [name for name, why in stale.items() if why is None]
    rerun = {name: why for name, why in stale.items() if why not in (None, "new")}
    line = f"resume: reusing {len(reused)} finished combination(s), running {len(stale) - len(reused)}"
    if rerun:
        line += "; recomputing " + "; ".join(f"{name} ({why})" for name, why in rerun.items())
    return line
