"""Fingerprints follow what decides a result's numbers, not the files the code lives in (research/resume.py)."""

from __future__ import annotations

import importlib

import pytest
from tiny import plan, shaped

import research.pruning
from research.config import load_config
from research.resume import FORMAT_CHANGED, code_digest, fingerprint, resume_line, stale_reason

SCORER = '''\
"""A user's scorer."""
from dataclasses import dataclass

from scorers import SCORERS, Scorer


def unrelated():
    return 1


def weights(signals):
    return signals.t2v


@SCORERS.register("{name}")
@dataclass
class Edited(Scorer):
    """Sums the attention."""

    scale: float = 1.0

    def score(self, signals):
        return weights(signals).sum(1) * self.scale  # the attention received
'''

MOVED = '''\
from dataclasses import dataclass
import math

from scorers import SCORERS, Scorer


@SCORERS.register("fp_moved")
@dataclass
class Edited(Scorer):
    """Sums the attention received by each vision token (moved here, docstring reworded)."""

    scale: float = 1.0

    def score(self, signals):
        # one comment more
        return weights(signals).sum(1) * self.scale


def weights(signals):
    """The text-to-vision attention."""
    return signals.t2v
'''


def user_module(tmp_path, monkeypatch, module: str, text: str):
    """``module`` written into a folder on the import path and imported."""
    folder = tmp_path / "user_code"
    folder.mkdir(exist_ok=True)
    (folder / f"{module}.py").write_text(text)
    monkeypatch.syspath_prepend(str(folder))
    return folder / f"{module}.py", importlib.import_module(module)


def edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_moved_or_reworded_class_keeps_its_digest_and_edited_code_it_runs_does_not(tmp_path, monkeypatch):
    path, module = user_module(tmp_path, monkeypatch, "fp_user_scorer", SCORER.format(name="fp_digest"))
    before = code_digest(module.Edited)
    assert before != "unknown"
    edit(path, "return 1", "return 2")  # an unrelated function beside it
    edit(path, '"""Sums the attention."""', '"""Sums the attention each vision token receives."""')
    assert code_digest(module.Edited) == before
    _, moved = user_module(tmp_path, monkeypatch, "fp_user_moved", MOVED)  # another file, its helper with it
    assert code_digest(moved.Edited) == before

    edit(path, "sum(1)", "mean(1)")  # its score()
    assert code_digest(module.Edited) != before
    edit(path, "mean(1)", "sum(1)")
    assert code_digest(module.Edited) == before
    edit(path, "return signals.t2v", "return signals.t2v.softmax(-1)")  # a helper its score() calls
    assert code_digest(module.Edited) != before


def test_the_project_code_a_class_names_is_followed_and_the_engine_is_not():
    from research.resume import _collect
    from scorers import SCORERS

    found: dict = {}
    fastv = SCORERS.get("fastv")
    _collect(fastv.__module__, fastv.__qualname__, found)
    assert {("scorers.fastv", "FastV"), ("scorers.base", "Scorer"), ("scorers.base", "softmax_dtype")} <= set(found)
    assert not [module for module, _ in found if module.startswith("research.pruning")]  # ENGINE_NUMERICS


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A config running a user scorer registered from a file, its combination and that file."""
    path, _ = user_module(tmp_path, monkeypatch, "fp_sweep_scorer", SCORER.format(name="fp_sweep"))
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("imports: [fp_sweep_scorer]\nscorers: [fp_sweep]\n"
                          "schedules: [{name: layers, layers: [1, 3]}]\nbudgets: [40]\n")
    cfg = load_config([f"experiment={experiment}"])
    return shaped(cfg), plan(cfg, 8, 144)[1], path


def test_a_result_is_reused_after_an_unrelated_edit_and_recomputed_after_its_score_changes(sweep):
    cfg, combo, path = sweep
    finished = {"status": "ok", "fingerprint": fingerprint(cfg, combo, weights="w")}
    edit(path, "return 1", "return 2")
    assert stale_reason(finished, fingerprint(cfg, combo, weights="w")) is None
    edit(path, "sum(1)", "mean(1)")
    assert stale_reason(finished, fingerprint(cfg, combo, weights="w")) == "scorer changed"


def test_the_engine_version_and_the_plan_are_part_of_the_fingerprint(sweep, monkeypatch):
    cfg, combo, _ = sweep
    finished = {"status": "ok", "fingerprint": fingerprint(cfg, combo, weights="w")}
    monkeypatch.setattr(research.pruning, "ENGINE_NUMERICS", research.pruning.ENGINE_NUMERICS + 1)
    assert stale_reason(finished, fingerprint(cfg, combo, weights="w")) == "engine changed"
    monkeypatch.undo()
    combo.keep = [k - 1 for k in combo.keep]
    assert stale_reason(finished, fingerprint(cfg, combo, weights="w")) == "plan changed"


def test_results_of_the_file_hashing_format_are_recomputed_with_one_line_for_the_run(sweep):
    cfg, combo, _ = sweep
    key = fingerprint(cfg, combo, weights="w")
    written_before = {"status": "ok", "fingerprint": {  # what research/run.py wrote until fingerprints had a format
        "config": key["config"], "weights": "w", "dataset": "0f3c", "scorer": "9a1b",
        "scorer settings": key["scorer settings"], "schedule": "77e2"}}
    assert stale_reason(written_before, key) == FORMAT_CHANGED
    stale = {f"c{i}": stale_reason(written_before, key) for i in range(3)} | {"new_one": "new"}
    line = resume_line(stale)
    assert "\n" not in line and line.count(FORMAT_CHANGED) == 1
    assert line.startswith("resume: reusing 0 finished combination(s), running 4; recomputing 3 written before")
    assert "c0" not in line


def test_the_resume_line_still_names_each_combination_recomputed_for_another_reason():
    line = resume_line({"a": None, "b": "scorer changed", "c": FORMAT_CHANGED, "d": "new"})
    assert line == ("resume: reusing 1 finished combination(s), running 3; recomputing 1 written before fingerprints "
                    "followed each class's code instead of whole files (fingerprint format changed); "
                    "recomputing b (scorer changed)")
