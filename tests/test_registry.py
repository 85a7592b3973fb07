"""The registry: decorator registration, duplicate and unknown names, user scorers."""

from __future__ import annotations

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
