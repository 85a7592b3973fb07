"""The lock the README installs, and the helpers of ``python -m research.deps``."""

from __future__ import annotations

from packaging.requirements import Requirement

from research import deps


def test_installed_packages_are_the_lock():
    """The README's test command installs exactly the locked versions (fails on any drift, either way)."""
    problems = deps.lock_mismatches(deps.read_lock(), deps.closure())
    hint = "\nreinstall with the README's command, or re-lock: python -m research.deps lock"
    assert not problems, "\n".join(problems) + hint


def test_lock_mismatches_name_each_difference():
    lock = {"torch": "2.13.0", "transformers": "5.24.0", "gone": "1.0"}
    installed = {"torch": "2.13.0+cpu", "transformers": "5.25.0", "new": "2.0"}
    assert deps.lock_mismatches(lock, installed) == [
        "gone==1.0 is locked but nothing requires it",
        "new==2.0 is installed and required but not in the lock",
        "transformers: locked 5.24.0, installed 5.25.0",
    ]


def test_lower_bounds_and_the_latest_plan_follow_pyproject():
    assert deps.lower_bound(Requirement("transformers>=5.0,<=5.25.0")) == "transformers==5.0"
    assert deps.lower_bound(Requirement("pytest")) == "pytest"
    torch_req, others = deps.install_plan("latest", keep_torch=True)
    assert torch_req == [f"torch=={deps.read_lock()['torch']}"]
    assert "transformers" in others and all("=" not in r and "<" not in r for r in others)
    lower_torch, lower_others = deps.install_plan("lower", keep_torch=False)
    assert lower_torch[0].startswith("torch==") and any(r.startswith("transformers==") for r in lower_others)


def test_upper_bounds_are_no_higher_than_the_lock():
    """pyproject's upper bounds say what was tested: the locked versions must lie inside every range."""
    lock = deps.read_lock()
    for requirement in deps.project_requirements():
        name = requirement.name.lower()
        if name in lock:
            assert requirement.specifier.contains(lock[name], prereleases=True), (requirement, lock[name])


def test_raising_upper_bounds_rewrites_only_the_named_packages(tmp_path, monkeypatch):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        'dependencies = [\n    "transformers>=5.0,<=5.24.0",\n    "lightning>=2.4",\n    "torch>=2.13",\n]\n'
    )
    monkeypatch.setattr(deps, "PYPROJECT", pyproject)
    changed = deps.raise_upper_bounds({"transformers": "5.25.0", "lightning": "2.6.6"}, ("transformers", "lightning"))
    assert changed == ["transformers <= 5.25.0", "lightning <= 2.6.6"]
    assert pyproject.read_text() == (
        'dependencies = [\n    "transformers>=5.0,<=5.25.0",\n    "lightning>=2.4,<=2.6.6",\n    "torch>=2.13",\n]\n'
    )
