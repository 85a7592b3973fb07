"""The project's modules import each other without cycles (function-level imports included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_modules() -> dict[str, Path]:
    """Every project module but package ``__init__`` files (a package importing its own modules is no cycle)."""
    paths = [*ROOT.glob("research/**/*.py"), *ROOT.glob("scorers/*.py"), *ROOT.glob("schedules/*.py")]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in paths if p.name != "__init__.py"}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from a import b``: ``a.b`` if a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & set(modules)


def test_no_module_imports_one_that_imports_it_back():
    modules = project_modules()
    graph = {name: imported_modules(path, modules) for name, path in modules.items()}
    cycles = []
    for start in graph:
        reached, frontier = set(), [start]
        while frontier:
            for name in graph[frontier.pop()] - reached:
                reached.add(name)
                frontier.append(name)
        if start in reached:
            cycles.append(start)
    assert not cycles, f"modules in an import cycle: {sorted(cycles)}"


USED_OUTSIDE_THE_CODE = {  # public names no project module uses, and what they are for
    "stop_string_table": "writes the README's stop-string table (tests/test_benchmarks.py checks the README)",
    "tokenize": "the shapes vocabulary's word split (tests/test_shapes_data.py checks questions against WORDS)",
    "crop_marker_ids": "the random Idefics3 / SmolVLM models' image-span markers (tests/test_families.py checks they "
                       "are never pruned)",
}


def test_every_public_definition_is_used_by_the_code_or_registered():
    """No dead code: each top-level public name is read by some project module, filed in a registry
    (``@X.register``), a module's ``main``, or listed above with what it is for."""
    modules = [*ROOT.glob("research/**/*.py"), *ROOT.glob("scorers/*.py"), *ROOT.glob("schedules/*.py")]
    texts = [path.read_text() for path in modules]
    unused = []
    for path, text in zip(modules, texts):
        for node in ast.parse(text).body:
            registered = any("register" in ast.unparse(d) for d in getattr(node, "decorator_list", []))
            targets = node.targets if isinstance(node, ast.Assign) else [node]
            for name in [getattr(t, "name", getattr(t, "id", "")) for t in targets]:
                uses = sum(len(re.findall(rf"\b{name}\b", t)) for t in texts)
                if name and not name.startswith("_") and name != "main" and not registered and \
                        name not in USED_OUTSIDE_THE_CODE and uses == 1:
                    unused.append(f"{path.relative_to(ROOT)}:{name}")
    assert not unused, f"defined but never used: {unused}"
