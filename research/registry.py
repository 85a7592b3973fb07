"""A small generic registry: components are chosen by string name, never by dotted path."""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; prints as its plain one-line message (not KeyError's repr)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to components (classes or factories) of one kind.

    >>> SCORERS = Registry("scorer")
    >>> @SCORERS.register("mine")
    ... class Mine: ...
    >>> SCORERS.get("mine") is Mine
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; a name can be taken only once."""

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered by module {self._origins[name]!r}; "
                    "choose another name"
                )
            module = inspect.getmodule(obj)
            self._entries[name] = obj
            self._origins[name] = module.__name__ if module else "<unknown>"
            if isinstance(obj, type):
                obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def get(self, name: str) -> T:
        """Return the entry called ``name``; an unknown name lists the choices and a close match."""
        if name not in self._entries:
            raise RegistryError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: object) -> str:
        choices = self.names()
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}; choose one of {choices}.{hint}"

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def discover(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    """Import every public module of ``package`` (its ``__path__``), sorted, so their decorators register them.

    A package's ``__init__`` calls it: a new component is one new file, with no import line to add. Private
    modules (``_name``) and those named in ``skip`` (not components, or imported by the ``__init__`` itself)
    are left alone. Returns the imported module names.
    """
    skip, names = set(skip), sorted(info.name for info in pkgutil.iter_modules(path))
    unknown = sorted(skip - set(names))
    if unknown:
        raise ValueError(f"skip names no module of {package}: {unknown}; its modules: {names}")
    chosen = [f"{package}.{name}" for name in names if not name.startswith("_") and name not in skip]
    for module in chosen:
        importlib.import_module(module)
    return chosen
