"""The registry: decorator registration, duplicate and unknown names, user scorers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from research.registry import Registry, RegistryError
from schedules import SCHEDULES
from scorers import SCORERS


def test_register_get_names():
    reg = Registry("widget")

    @reg.register("b")
    class B: ...

    @reg.register("a")
    def make_a(): ...

    assert reg.get("b") is B and reg.get("a") is make_a
    assert reg.names() == ["a", "b"]
    assert B.registry_name == "b"


def test_duplicate_names_the_first_module():
    reg = Registry("widget")
    reg.register("x")(type("X", (), {}))
    with pytest.raises(RegistryError, match=r"widget 'x' is already registered by module"):
        reg.register("x")(type("Y", (), {}))


def test_unknown_lists_choices_and_suggests():
    with pytest.raises(RegistryError) as info:
        SCORERS.get("text_priro")
    message = str(info.value)
    assert message.startswith("unknown scorer 'text_priro'; choose one of [")
    assert "Did you mean 'text_prior'?" in message
    assert "\n" not in message


def test_builtin_entries():
    assert {"text_prior", "static_prompt", "fastv", "pdrop", "random"} <= set(SCORERS.names())
    assert {"layers", "uniform", "single", "random"} <= set(SCHEDULES.names())


def test_user_scorer_registers_by_decorator():
    from dataclasses import dataclass

    from scorers import Scorer

    @SCORERS.register("test_only_norm")
    @dataclass
    class Norm(Scorer):
        def score(self, signals):
            return signals.t2v.sum(1)

    try:
        assert SCORERS.get("test_only_norm") is Norm
    finally:
        SCORERS._entries.pop("test_only_norm")
        SCORERS._origins.pop("test_only_norm")


# ---- discovery: a component is one file in its package ------------------------------------------------------


def test_discover_imports_the_public_modules_of_a_package_in_sorted_order(tmp_path, monkeypatch):
    """``discover`` imports every public module of a package (sorted), not private ones nor those it skips."""
    from research.registry import discover

    package = tmp_path / "widgets_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from research.registry import Registry\nWIDGETS = Registry('widget')\n"
                                         "ORDER = []\n")
    for name in ("beta", "alpha", "_private", "helper"):
        (package / f"{name}.py").write_text(
            "from widgets_pkg import ORDER, WIDGETS\n"
            f"ORDER.append({name!r})\n"
            f"@WIDGETS.register({name!r})\n"
            "class Widget: ...\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import widgets_pkg

        imported = discover("widgets_pkg", widgets_pkg.__path__, skip=("helper",))
        assert widgets_pkg.ORDER == ["alpha", "beta"]
        assert widgets_pkg.WIDGETS.names() == ["alpha", "beta"]
        assert imported == ["widgets_pkg.alpha", "widgets_pkg.beta"]
    finally:
        for name in [m for m in sys.modules if m == "widgets_pkg" or m.startswith("widgets_pkg.")]:
            del sys.modules[name]


def test_discover_refuses_a_skip_that_names_no_module(tmp_path):
    from research.registry import discover

    (tmp_path / "alpha.py").write_text("")
    with pytest.raises(ValueError, match=r"skip names no module of pkg: \['gone'\]; its modules: \['alpha'\]"):
        discover("pkg", [str(tmp_path)], skip=("gone",))


DROPPED = {
    "scorers/dropped_scorer.py": '''
from scorers.base import SCORERS, Scorer


@SCORERS.register("dropped_scorer")
class DroppedScorer(Scorer):
    def score(self, signals):
        return signals.t2v.sum(1)
''',
    "schedules/dropped_schedule.py": '''
from dataclasses import dataclass

from schedules.base import SCHEDULES, Schedule


@SCHEDULES.register("dropped_schedule")
@dataclass
class DroppedSchedule(Schedule):
    def propose(self, num_layers):
        return [1]
''',
    "research/data/dropped_benchmark.py": '''
from research.data import DATASETS
from research.data.benchmark import SnapshotBenchmark


@DATASETS.register("dropped_benchmark")
class DroppedBenchmark(SnapshotBenchmark):
    name = "dropped_benchmark"
    folder = "Dropped"
''',
    "research/models/dropped_family.py": '''
from research.models.base import register
from research.models.llava import LlavaAdapter


@register
class DroppedAdapter(LlavaAdapter):
    family = "dropped_family"
    model_class = "DroppedForConditionalGeneration"
''',
}

LIST_REGISTRIES = """
import json
import research, scorers, schedules
from research.data import DATASETS
from research.models import FAMILIES, MODELS
from schedules import SCHEDULES
from scorers import SCORERS
print(json.dumps({"files": [research.__file__, scorers.__file__, schedules.__file__],
                  "scorers": SCORERS.names(), "schedules": SCHEDULES.names(), "datasets": DATASETS.names(),
                  "families": FAMILIES.names(), "models": MODELS.names()}))
"""


@pytest.mark.slow
def test_a_new_scorer_schedule_benchmark_or_family_is_one_file_in_its_package(tmp_path):
    """A copy of the packages with one new file dropped into each: importing the packages registers all four,
    and nothing else in the copy changed (no import line added anywhere)."""
    root = Path(__file__).resolve().parent.parent
    ignore = shutil.ignore_patterns("__pycache__", "assets", "*.pyc")
    for package in ("research", "scorers", "schedules"):
        shutil.copytree(root / package, tmp_path / package, ignore=ignore)
    for path, source in DROPPED.items():
        (tmp_path / path).write_text(source.lstrip())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", LIST_REGISTRIES], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert all(Path(f).is_relative_to(tmp_path) for f in listed["files"]), listed["files"]
    assert "dropped_scorer" in listed["scorers"]
    assert "dropped_schedule" in listed["schedules"]
    assert "dropped_benchmark" in listed["datasets"]
    assert "dropped_family" in listed["families"] and "dropped_family" in listed["models"]


# ---- adapters: what the engine needs, no test scaffolding ---------------------------------------------------

SCAFFOLDING = ("random_config", "random_model", "random_inputs", "random_text_sizes", "left_padded", "left_pad")


def test_family_adapters_carry_no_test_scaffolding():
    """Random-weight models and their inputs live in one module, ``research.models.testing``, for every family."""
    import research.models
    from research.models import FAMILIES

    for name in FAMILIES.names():
        adapter = FAMILIES.get(name)
        module = sys.modules[adapter.__module__]
        assert not [n for n in SCAFFOLDING if hasattr(adapter, n) or n in vars(module)], (name, module.__name__)
    assert not [n for n in SCAFFOLDING if n in vars(research.models.base)]
    from research.models import testing

    assert testing.RANDOM_CONFIGS.names() == sorted(testing.configurations())  # families and named variants
    assert testing.RANDOM_INPUTS.names() == FAMILIES.names()
