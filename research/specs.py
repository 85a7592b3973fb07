"""Scorer and schedule entries of a configuration, parsed into typed specs; :func:`build` makes a component of one.

An entry is a registry name or a mapping ``{name: ..., <its parameters>}``; a scorer's mapping may also carry its
own protocol (``schedules: [...]``, ``positions: original|compact``), overriding the experiment's. This module is
the one place an entry is read and the one place a name becomes an object: :func:`parse_scorers` and
:func:`parse_schedules` check every name and parameter (one :class:`ConfigError` line each) and return the specs
the rest of the project uses.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from research.registry import Registry

CHANGEPOINT = "changepoint"  # the schedule that may derive its layers from the model's own attention shifts
SCORER_PROTOCOL = ("schedules", "positions")  # keys of a scorer entry that are not scorer parameters
DEFAULT_CALIBRATION_SAMPLES = 200


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the value and the valid choices."""


def build(registry: Registry[Any], name: str, params: dict[str, Any]) -> Any:
    """The component ``name`` of ``registry`` with ``params``: an unknown name or a bad parameter is one
    ConfigError line (the registry's choices, or the component's own message)."""
    if name not in registry:
        raise ConfigError(registry.unknown_message(name))
    try:
        return registry.get(name)(**params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{registry.kind} {name!r}: {error}") from None


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule entry, e.g. ``{name: layers, layers: [1, 10, 20]}``."""

    name: str
    params: dict[str, Any]
    index: int | None = None  # its place among the experiment's schedules; None: a scorer entry's own
    calibration_samples: int | None = None  # a changepoint entry deriving its layers from N samples; None: given

    @property
    def label(self) -> str:
        return label(self.name, self.params)

    @property
    def calibrates(self) -> bool:
        return self.calibration_samples is not None

    def build(self, histogram: list[int] | None = None) -> Any:
        """The schedule; ``histogram``: the shift histogram a calibrating changepoint entry derives its layers from."""
        from schedules import SCHEDULES

        extra = {} if histogram is None else {"histogram": histogram}
        return build(SCHEDULES, self.name, {**self.params, **extra})


@dataclass(frozen=True)
class ScorerSpec:
    """A scorer entry: its parameters, and the protocol it runs under (the experiment's, or its own)."""

    name: str
    params: dict[str, Any]
    positions: str  # original | compact: the entry's own, else the experiment's
    own_positions: bool  # the entry chose its positions (then part of the combination's name)
    own_schedules: tuple[ScheduleSpec, ...] | None = None  # the entry's own schedules, replacing the experiment's

    @property
    def component(self) -> Any:
        """The registered scorer class (its class attributes: ``pre_llm``, ``needs_llm_attention``, ...)."""
        from scorers import SCORERS

        return SCORERS.get(self.name)

    def build(self) -> Any:
        from scorers import SCORERS

        return build(SCORERS, self.name, self.params)


def entry(spec: Any) -> tuple[str, dict]:
    """(name, parameters) of a registry entry given as a name or a mapping ``{name: ..., **params}``."""
    if isinstance(spec, (DictConfig, ListConfig)):
        spec = OmegaConf.to_container(spec)
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and "name" in spec:
        params = {k: v for k, v in spec.items() if k != "name"}
        return str(spec["name"]), params
    raise ConfigError(f"an entry must be a name or a mapping with a 'name' key, got {spec!r}")


def expand_seeds(registry: Registry[Any], name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """An entry's parameters, once per seed of its ``seeds: [...]`` (a seeded component: one entry per seed, as
    if each were listed with its ``seed``); an entry without ``seeds`` as it is."""
    if "seeds" not in params:
        return [params]
    seeds = params["seeds"]
    if name in registry and "seed" not in inspect.signature(registry.get(name)).parameters:
        raise ConfigError(f"{registry.kind} {name!r} takes no seed, so 'seeds' does not apply; seeded "
                          f"{registry.kind}s: {[n for n in registry.names() if _seeded(registry.get(n))]}")
    if "seed" in params:
        raise ConfigError(f"{registry.kind} {name!r}: give seed or seeds, not both")
    if (not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in seeds) or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{registry.kind} {name!r}: seeds must be a non-empty list of distinct integers, "
                          f"got {seeds!r}")
    rest = {k: v for k, v in params.items() if k != "seeds"}
    return [{**rest, "seed": seed} for seed in seeds]


def _seeded(component: Any) -> bool:
    return "seed" in inspect.signature(component).parameters


def parse_schedules(specs: Sequence[Any], owner: str | None = None) -> tuple[ScheduleSpec, ...]:
    """The experiment's ``schedules`` (``owner`` None) or a scorer entry's own, checked (each is built once); an
    entry with ``seeds: [...]`` is one entry per seed.

    A changepoint entry without ``layers`` or ``histogram`` calibrates on the model: only the experiment's may."""
    from schedules import SCHEDULES

    entries = [(name, seeded) for name, params in map(entry, specs)
               for seeded in expand_seeds(SCHEDULES, name, params)]
    parsed = []
    for index, (name, params) in enumerate(entries):
        build(SCHEDULES, name, params)
        samples = None
        if name == CHANGEPOINT and params.get("layers") is None and params.get("histogram") is None:
            if owner is not None:
                raise ConfigError(f"scorer {owner!r}: a calibrated changepoint schedule belongs in the experiment's "
                                  "schedules, not a scorer's own (give it layers: [...] here)")
            samples = int(params.get("samples", DEFAULT_CALIBRATION_SAMPLES))
        parsed.append(ScheduleSpec(name, params, None if owner else index, samples))
    return tuple(parsed)


def parse_scorers(specs: Sequence[Any], positions: str, position_modes: Sequence[str]) -> tuple[ScorerSpec, ...]:
    """The experiment's ``scorers``, checked (each is built once), with the protocol each runs under: its own
    ``schedules`` / ``positions`` where the entry gives them, else the experiment's (``positions``). An entry
    with ``seeds: [...]`` is one entry per seed."""
    from scorers import SCORERS

    parsed = []
    for name, given in map(entry, specs):
        protocol = {key: given.pop(key) for key in SCORER_PROTOCOL if key in given}
        for params in expand_seeds(SCORERS, name, given):
            parsed.append(_scorer_spec(name, params, protocol, positions, position_modes))
    return tuple(parsed)


def _scorer_spec(name: str, params: dict[str, Any], protocol: dict[str, Any], positions: str,
                 position_modes: Sequence[str]) -> ScorerSpec:
    from scorers import SCORERS

    build(SCORERS, name, params)
    own_positions = protocol.get("positions", positions)
    if own_positions not in position_modes:
        raise ConfigError(f"scorer {name!r}: unknown positions {own_positions!r}; choose one of {list(position_modes)}")
    schedules = None
    if "schedules" in protocol:
        if SCORERS.get(name).pre_llm:
            raise ConfigError(f"scorer {name!r} prunes once before the LLM: schedules do not apply to it")
        if not isinstance(protocol["schedules"], list) or not protocol["schedules"]:
            raise ConfigError(f"scorer {name!r}: schedules must be a non-empty list of schedule entries, "
                              f"got {protocol['schedules']!r}")
        schedules = parse_schedules(protocol["schedules"], owner=name)
    return ScorerSpec(name, params, own_positions, "positions" in protocol, schedules)


LAYER_LABEL_KEYS = {"layers", "scale_from", "prune_before", "counts", "reference_tokens"}  # a listed schedule's
# counts are left out of its label: the plan (and the fingerprint) holds them, and two listed entries at the same
# layers are one combination name twice, which the sweep refuses


def label(name: str, params: dict) -> str:
    """Short readable label of an entry: ``layers[1-10-20]``, ``layers[before-8-16-24]`` (``prune_before``),
    ``listed[2-6-15/32]``, ``random(seed=3)``."""
    if not params:
        return name
    if name in ("layers", "listed") and "layers" in params and set(params) <= LAYER_LABEL_KEYS:
        before = "before-" if params.get("prune_before") else ""
        scale = f"/{params['scale_from']}" if params.get("scale_from") is not None else ""
        return f"{name}[{before}{'-'.join(str(x) for x in params['layers'])}{scale}]"
    values = ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(params.items()))
    return f"{name}({values})"


def slug(text: str) -> str:
    """A file-name-safe form of a label: ``layers[1-10-20]`` -> ``layers1-10-20``, ``/32`` -> ``_of32``."""
    text = text.replace("/", "_of")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", re.sub(r"[\[\]()]", "", text)).strip("_")


REFERENCE_KEYS = ("scorer", "schedule", "budget")


@dataclass(frozen=True)
class ReferenceSpec:
    """The combination each one is tested against besides vanilla: the one whose scorer / schedule / budget are
    those named (a registry name or a label), the others the combination's own. ``given``: named in the
    configuration (ambiguity or no match is an error); else the default, ``random`` where the sweep has it."""

    scorer: str | None = "random"
    schedule: str | None = None
    budget: float | None = None
    given: bool = False

    def __str__(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in REFERENCE_KEYS if getattr(self, k) is not None)

    def names(self, combo: Any) -> bool:
        """``combo`` is of the reference kind (has every field the spec names)."""
        return ((self.scorer is None or self.scorer in (combo.scorer, combo.scorer_label))
                and (self.schedule is None or self.schedule in (combo.schedule_name, combo.schedule,
                                                                combo.schedule.split("@")[0]))
                and (self.budget is None or self.budget == combo.budget))

    def serves(self, reference: Any, combo: Any) -> bool:
        """``reference`` is ``combo``'s: of the reference kind, and equal to it in every field not named."""
        return (self.names(reference) and reference.positions == combo.positions
                and (self.scorer is not None or reference.scorer_label == combo.scorer_label)
                and (self.schedule is not None or reference.schedule == combo.schedule)
                and (self.budget is not None or reference.budget == combo.budget))


def parse_reference(value: Any) -> ReferenceSpec:
    """``reference``: null (the default), a scorer name or label, or a mapping of scorer / schedule / budget."""
    if value is None:
        return ReferenceSpec()
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return ReferenceSpec(scorer=value, given=True)
    if not isinstance(value, dict) or not value or set(value) - set(REFERENCE_KEYS):
        raise ConfigError(f"reference must be a scorer name or a mapping of {list(REFERENCE_KEYS)}, got {value!r}")
    try:
        budget = None if value.get("budget") is None else float(value["budget"])
    except (TypeError, ValueError):
        raise ConfigError(f"reference budget must be a number, got {value['budget']!r}") from None
    return ReferenceSpec(value.get("scorer"), value.get("schedule"), budget, given=True)
