"""What a finished combination's result depends on, and whether a re-run may reuse it.

A result is reused when its fingerprint equals the one the re-run computes. The fingerprint follows what
decides the numbers, not the files the code happens to live in, so a refactor (a class moved to another file, an
unrelated function edited beside it, a comment or docstring changed) reuses results, while an edited ``score()``
does not:

* ``config``: model, data settings, eval settings (not the summary's statistics: ``SUMMARY_ONLY``), seed, positions,
  counting (the command's knobs);
* ``weights``: the checkpoint (:func:`research.storage.weights_digest`);
* ``engine``: :data:`research.pruning.ENGINE_NUMERICS`, a version bumped by hand when the engine's numerics change.
  The engine is shared by every combination and deep (hooks, signals, cache surgery); hashing its code would
  re-run everything on any engine refactor, and tracing what a scorer calls through ``signals`` is not possible
  statically, so it is versioned by hand instead;
* ``dataset``, ``model adapter``, ``scorer``: :func:`code_digest` of the class that ran: its own source and
  that of the project code it names, transitively (base classes, module-level helpers and constants, imported
  project functions), compared as syntax trees without docstrings. The adapter is included because it builds the
  model's inputs and reads its layout;
* ``scorer settings``: the scorer's parameters with its defaults filled in (a default changed in the code, e.g.
  pdrop's attention, re-runs the combination);
* ``plan``: the pruning locations, keep counts and positions the schedule resolved to. A schedule only proposes
  the plan, so the plan, not the schedule's source, is what the numbers depend on.

``format`` names this scheme; results written under an older one are recomputed, with one line saying why.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import importlib.util
import json
import sys
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from research.combination import Combination
from research.experiment import Experiment

FORMAT = "2"  # 1: whole source files were hashed; 2: what decides the numbers (this module)
FORMAT_CHANGED = "fingerprint format changed"
PROJECT_PACKAGES = ("research", "scorers", "schedules")
VERSIONED_BY_HAND = "research.pruning"  # the engine: ENGINE_NUMERICS, not its code


SUMMARY_ONLY = ("bootstrap", "confidence", "interval")  # eval settings of the summary's statistics, not of a result


def fingerprint(experiment: Experiment, combo: Combination, weights: str, task: Any = None) -> dict[str, str]:
    """Everything a finished combination's result depends on, by part (a re-run names the parts that changed).

    ``task`` is the dataset it ran on (``None``: the first configured one, not opened). The model adapter is the
    family's (``-`` for a model planned for a shape alone).
    """
    from research.data import DATASETS
    from research.data.benchmark import DEFAULT_MAX_NEW_TOKENS
    from research.pruning import ENGINE_NUMERICS
    from scorers import SCORERS

    if task is None:  # the first dataset, not opened: its settings as configured (shapes: split test)
        data, tokens = experiment.data.settings, experiment.eval.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    else:
        data, tokens = task.data_key, task.max_new_tokens
    run_settings = {k: v for k, v in dataclasses.asdict(experiment.eval).items() if k not in SUMMARY_ONLY}
    keys = {"model": experiment.model.settings, "data": data,
            "eval": {**run_settings, "max_new_tokens": tokens}, "seed": experiment.seed,
            "positions": experiment.positions, "counting": experiment.counting}
    config = json.dumps(OmegaConf.to_container(OmegaConf.structured(keys)), sort_keys=True)
    plan = {"locations": combo.locations, "keep": combo.keep, "positions": combo.positions,
            "relative": combo.relative}
    adapter = experiment.model.adapter
    return {
        "format": FORMAT,
        "config": _digest(config),
        "weights": weights,
        "engine": str(ENGINE_NUMERICS),
        "dataset": code_digest(DATASETS.get(data["name"])),
        "model adapter": "-" if adapter is None else code_digest(adapter),
        "scorer": "-" if combo.is_vanilla else code_digest(SCORERS.get(combo.scorer)),
        "scorer settings": _digest(json.dumps(scorer_settings(combo))),
        "plan": "-" if combo.is_vanilla else _digest(json.dumps(plan, sort_keys=True)),
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
    if old.get("format") != key.get("format"):
        return FORMAT_CHANGED
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
    """One line: how many combinations are reused, how many run, and why each stale one runs again
    (results of an older fingerprint format are counted, not named)."""
    reused = [name for name, why in stale.items() if why is None]
    rerun = {name: why for name, why in stale.items() if why not in (None, "new", FORMAT_CHANGED)}
    older = sum(why == FORMAT_CHANGED for why in stale.values())
    line = f"resume: reusing {len(reused)} finished combination(s), running {len(stale) - len(reused)}"
    if older:
        line += (f"; recomputing {older} written before fingerprints followed each class's code instead of whole "
                 f"files ({FORMAT_CHANGED})")
    if rerun:
        line += "; recomputing " + "; ".join(f"{name} ({why})" for name, why in rerun.items())
    return line


# ---- code digests ----------------------------------------------------------------------------------------------

def code_digest(obj: Any) -> str:
    """Hash of the code that decides what class or function ``obj`` does: its own syntax tree and, transitively,
    those of the project definitions it names (docstrings, comments, layout and file left out). The engine
    (``research.pruning``) is not followed: :data:`research.pruning.ENGINE_NUMERICS` versions it.

    Read from disk now, so an edit shows at once; ``"unknown"`` if the source cannot be read."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if not module or "<locals>" in qualname:
        return "unknown"
    found: dict[tuple[str, str], str] = {}
    try:
        _collect(module, qualname, found)
    except (OSError, SyntaxError, KeyError, ImportError, ValueError):
        return "unknown"
    return _digest("\n".join(sorted(found.values())))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _collect(module: str, qualname: str, found: dict[tuple[str, str], str]) -> None:
    """Add the definition ``module.qualname`` and what it names to ``found`` ((module, name) -> dumped tree)."""
    top = qualname.split(".")[0]  # a nested class counts as the class around it
    if (module, top) in found:
        return
    index = _module_index(module)
    found[module, top] = index.dump(top)
    for name, attribute in _names_used(index.definitions[top]):
        _resolve(module, index, name, attribute, found)


def _resolve(module: str, index: _ModuleIndex, name: str, attribute: str | None,
             found: dict[tuple[str, str], str]) -> None:
    """Follow ``name`` (``name.attribute`` when ``name`` is a module) as ``module`` binds it, if it is project code."""
    if name in index.definitions:
        _collect(module, name, found)
        return
    target = index.imports.get(name)
    if target is None:
        return  # a builtin, a local or a parameter
    source, imported = target
    if imported is None:  # ``import a.b as name``: the module itself
        source, imported = source, attribute
    elif attribute is not None and _is_module(f"{source}.{imported}"):  # ``from a import b``; ``b.attribute``
        source, imported = f"{source}.{imported}", attribute
    if imported is None or not _is_followed(source):
        return
    source_index = _module_index(source)
    if imported in source_index.definitions:
        _collect(source, imported, found)
    elif imported in source_index.imports:  # re-exported (``from research.pruning import ...``)
        _resolve(source, source_index, imported, None, found)


def _is_followed(module: str) -> bool:
    top = module.split(".")[0]
    return (top in PROJECT_PACKAGES or not _is_installed(top)) and not (
        module == VERSIONED_BY_HAND or module.startswith(VERSIONED_BY_HAND + "."))


@cache
def _is_installed(top: str) -> bool:
    """A top-level package from the standard library or site-packages (not the project's or a user's code)."""
    if top in sys.stdlib_module_names or top == "__future__":
        return True
    spec = importlib.util.find_spec(top)
    origin = (spec.origin or "") if spec else ""
    return spec is None or "site-packages" in origin or "dist-packages" in origin or origin in ("built-in", "frozen")


@cache
def _is_module(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@dataclasses.dataclass
class _ModuleIndex:
    definitions: dict[str, ast.AST]  # top-level name -> the def, class or assignment that binds it
    imports: dict[str, tuple[str, str | None]]  # top-level name -> (module, name in it); (module, None): a module
    dumps: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> its tree without docstrings

    def dump(self, name: str) -> str:
        if name not in self.dumps:
            self.dumps[name] = ast.dump(_without_docstrings(self.definitions[name]))
        return self.dumps[name]


def _module_index(module: str) -> _ModuleIndex:
    path = _source_path(module)
    return _parse(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")


def _source_path(module: str) -> Path:
    loaded = sys.modules.get(module)
    file = getattr(loaded, "__file__", None) if loaded else None
    if file is None:
        spec = importlib.util.find_spec(module)
        file = spec.origin if spec else None
    if not file or not file.endswith(".py"):
        raise ImportError(f"no Python source for {module}")
    return Path(file)


@lru_cache(maxsize=256)
def _parse(text: str, module: str, is_package: bool) -> _ModuleIndex:
    """The top-level definitions and imports of ``module``'s source ``text`` (cached per text)."""
    tree = ast.parse(text)
    package = module if is_package else module.rpartition(".")[0]
    definitions: dict[str, ast.AST] = {}
    imports: dict[str, tuple[str, str | None]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            definitions[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        definitions[name.id] = node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    imports[alias.asname] = (alias.name, None)
                else:
                    imports[alias.name.split(".")[0]] = (alias.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{source}" if source else base
            for alias in node.names:
                if alias.name != "*":
                    imports[alias.asname or alias.name] = (source, alias.name)
    return _ModuleIndex(definitions, imports)


def _names_used(node: ast.AST) -> list[tuple[str, str | None]]:
    """The names ``node`` reads, each with the attribute read from it (``a.b`` -> ("a", "b")). Annotations are
    left out (they describe, they do not run), and so are decorators' names: ``@SCORERS.register`` files a class
    without changing what it computes (the decorators themselves are in the tree, so ``@dataclass`` counts)."""
    used: list[tuple[str, str | None]] = []

    def visit(child: ast.AST) -> None:
        if isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name):
            used.append((child.value.id, child.attr))
            return
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
            used.append((child.id, None))
            return
        for field, value in ast.iter_fields(child):
            if field in ("annotation", "returns", "decorator_list"):
                continue
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ast.AST):
                    visit(item)

    visit(node)
    return used


def _without_docstrings(node: ast.AST) -> ast.AST:
    """A copy of ``node`` whose classes and functions have no docstring and no ``@REGISTRY.register(name)``
    decorator (the name a class is filed under does not change what it computes)."""
    bare = copy.deepcopy(node)
    for child in ast.walk(bare):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if ast.get_docstring(child):
                child.body = child.body[1:] or [ast.Pass()]
            child.decorator_list = [d for d in child.decorator_list if not _is_registration(d)]
    return bare


def _is_registration(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute) and \
        decorator.func.attr == "register"

