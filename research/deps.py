"""Locked installs and the dependency checks that keep them honest.

``research/constraints.txt`` pins every package the README's commands install (the transitive
closure of ``vtprune[dev]``); ``pyproject.toml`` keeps the supported ranges: lower bounds tested by
``check lower``, upper bounds no higher than the newest release tested.

    python -m research.deps verify          # installed packages == the lock (.ci/run runs this)
    python -m research.deps check latest    # fresh venv, newest releases of everything: fast tests
    python -m research.deps check lower     # fresh venv, pyproject's lower bounds: fast tests
    python -m research.deps raise           # check latest (torch kept at the lock's); if it passes,
                                            # lock it and raise the upper bounds of what moved
    python -m research.deps lock            # rewrite the lock from this environment

torch is special: the setup commands install ``torch==<locked>`` FIRST, because an unpinned torch
on a fresh machine pulls a multi-GB CUDA build. ``check latest`` still tries the newest torch pip
can install here (``--keep-torch`` skips that).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "research" / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"
PROJECT = "vtprune"
HEADLINE = ("torch", "transformers", "lightning")  # the releases that move under us
FAST_TESTS = ["-m", "pytest", "-q", "-m", "not slow and not gpu", "-p", "no:cacheprovider"]
LOCK_HEADER = """\
# The tested set of every package `pip install -e ".[dev]"` installs (python -m research.deps lock).
# Used by the README's commands and .ci/run: pip install torch==<torch below> && pip install -c {path} -e ".[dev]"
"""


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of a lock file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a local build label is the same release."""
    return version.split("+", 1)[0]


def closure(root: str = PROJECT, extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """{canonical name: installed version} of every package ``root[extras]`` needs, transitively."""
    environment = default_environment()
    found: dict[str, str] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted_extras = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is required but not installed; install the project first") from None
        for text in dist.requires or []:
            requirement = Requirement(text)
            marker_ok = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in (wanted_extras or {""})
            )
            key = canonicalize_name(requirement.name)
            if marker_ok and key not in found:
                found[key] = metadata.version(requirement.name)
                todo.append((requirement.name, set(requirement.extras)))
    found.pop(canonicalize_name(root), None)
    return dict(sorted(found.items()))


def lock_mismatches(lock: dict[str, str], installed: dict[str, str]) -> list[str]:
    """What differs between a lock and an installed closure, one line each (empty: they agree)."""
    problems = []
    for name in sorted(lock.keys() | installed.keys()):
        want, have = lock.get(name), installed.get(name)
        if want is None:
            problems.append(f"{name}=={have} is installed and required but not in the lock")
        elif have is None:
            problems.append(f"{name}=={want} is locked but nothing requires it")
        elif _public(want) != _public(have):
            problems.append(f"{name}: locked {want}, installed {have}")
    return problems


def write_lock(pins: dict[str, str], path: Path = LOCK) -> None:
    lines = [f"{name}=={_public(version)}" for name, version in sorted(pins.items())]
    path.write_text(LOCK_HEADER.format(path=path.relative_to(ROOT)) + "\n".join(lines) + "\n")


# ---- fresh-environment checks ------------------------------------------------------------------
def project_requirements() -> list[Requirement]:
    """The project's runtime and dev requirements, as written in pyproject.toml."""
    import tomllib

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def lower_bound(requirement: Requirement) -> str:
    """``name==<lowest version the specifier allows>`` (its ``>=`` bound), or the bare name."""
    lows = [s.version for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    return f"{requirement.name}=={lows[0]}" if lows else requirement.name


def install_plan(against: str, keep_torch: bool) -> tuple[list[str], list[str]]:
    """(torch requirement, other requirements) to install for ``against`` in {latest, lower, lock}."""
    requirements = [r for r in project_requirements() if canonicalize_name(r.name) != "torch"]
    torch_req = next(r for r in project_requirements() if canonicalize_name(r.name) == "torch")
    locked_torch = f"torch=={read_lock()['torch']}"
    if against == "latest":
        return ([locked_torch] if keep_torch else ["torch"]), [r.name for r in requirements]
    if against == "lower":
        return [lower_bound(torch_req)], [lower_bound(r) for r in requirements]
    if against == "lock":
        return [locked_torch], [str(r) for r in requirements]
    raise SystemExit(f"unknown target {against!r}; choose one of ['latest', 'lower', 'lock']")


def fresh_check(against: str, keep_torch: bool = False, venv: Path | None = None) -> tuple[int, dict[str, str]]:
    """Create a venv, install ``against``'s versions and the project, run the fast tests there.

    Returns (pytest's exit code, {package: version} of the headline packages in that venv).
    """
    venv = venv or Path(tempfile.mkdtemp(prefix=f"vtprune-{against}-"))
    python = venv / "bin" / "python"
    torch_req, others = install_plan(against, keep_torch)
    constraints = ["-c", str(LOCK)] if against == "lock" else []
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", *torch_req],
        [str(python), "-m", "pip", "install", "--quiet", *constraints, *others],
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)],
    ]
    started = time.perf_counter()
    for step in steps:
        print("$", " ".join(step[2:] if step[0] == str(python) else step), flush=True)
        if subprocess.run(step).returncode != 0:
            raise SystemExit(f"installing for the {against} check failed at: {' '.join(step)}")
    versions = installed_versions(python, [*HEADLINE, *(Requirement(r).name for r in others)])
    print(f"[{against}] installed in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{name} {version}" for name, version in versions.items()), flush=True)
    if against == "latest":
        for name in HEADLINE:
            newest = newest_release(python, name)
            if newest and _public(newest) != _public(versions[name]):
                print(f"[latest] note: {name} {newest} is the newest release on the index, but pip could not "
                      f"install it here (a dependency of it is missing, or a local cap): tested {versions[name]}")
    # Only the lock's own environment can pass the test that compares it with the lock.
    unlocked = [] if against == "lock" else ["--deselect", "tests/test_deps.py::test_installed_packages_are_the_lock"]
    result = subprocess.run([str(python), *FAST_TESTS, *unlocked], cwd=ROOT)
    print(f"[{against}] fast tests {'passed' if result.returncode == 0 else 'FAILED'} "
          f"(exit {result.returncode}) with " + ", ".join(f"{n} {versions[n]}" for n in HEADLINE)
          + f"; venv: {venv}", flush=True)
    return result.returncode, versions


def newest_release(python: Path, name: str) -> str | None:
    """The newest version of ``name`` the package index lists (``pip index versions``), if it answers."""
    out = subprocess.run([str(python), "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    match = re.match(rf"{re.escape(name)} \(([^)]+)\)", out.stdout.strip(), flags=re.IGNORECASE)
    return match.group(1) if match else None


def installed_versions(python: Path, names: list[str]) -> dict[str, str]:
    code = "import sys, importlib.metadata as m; print('\\n'.join(n + ' ' + m.version(n) for n in sys.argv[1:]))"
    out = subprocess.run([str(python), "-c", code, *dict.fromkeys(names)], capture_output=True, text=True, check=True)
    return dict(line.split(" ", 1) for line in out.stdout.splitlines())


def raise_upper_bounds(versions: dict[str, str], names: tuple[str, ...]) -> list[str]:
    """Set ``<=version`` as the upper bound of ``names`` in pyproject.toml; returns what changed."""
    text, changed = PYPROJECT.read_text(), []
    for name in names:
        pattern = re.compile(rf'"{name}(>=[^,"]+)(,<=[^"]+)?"')
        match = pattern.search(text)
        if match and match.group(2) != f",<={_public(versions[name])}":
            text = pattern.sub(f'"{name}\\1,<={_public(versions[name])}"', text, count=1)
            changed.append(f"{name} <= {_public(versions[name])}")
    PYPROJECT.write_text(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.deps", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="the installed closure of vtprune[dev] equals the lock")
    sub.add_parser("lock", help="rewrite the lock from this environment")
    check = sub.add_parser("check", help="fast tests in a fresh venv")
    check.add_argument("against", choices=["latest", "lower", "lock"])
    check.add_argument("--keep-torch", action="store_true", help="latest: keep the lock's torch")
    check.add_argument("--venv", type=Path, help="where to create the venv (default: a temporary folder)")
    sub.add_parser("raise", help="check latest with the lock's torch; if it passes, lock it and raise bounds")
    args = parser.parse_args(argv)

    if args.command == "verify":
        problems = lock_mismatches(read_lock(), closure())
        for line in problems:
            print(line)
        print(f"lock {LOCK.relative_to(ROOT)}: {'OK' if not problems else f'{len(problems)} mismatch(es)'}")
        return 1 if problems else 0
    if args.command == "lock":
        write_lock(closure())
        print(f"wrote {LOCK.relative_to(ROOT)}")
        return 0
    if args.command == "check":
        return fresh_check(args.against, args.keep_torch, args.venv)[0]
    venv = Path(tempfile.mkdtemp(prefix="vtprune-raise-"))
    code, versions = fresh_check("latest", keep_torch=True, venv=venv)
    if code != 0:
        print("the newest releases fail the fast tests: lock and bounds unchanged")
        return code
    subprocess.run([str(venv / "bin" / "python"), "-m", "research.deps", "lock"], cwd=ROOT, check=True)
    changed = raise_upper_bounds(versions, ("transformers", "lightning"))
    print("raised: " + (", ".join(changed) or "nothing (already the newest)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
