"""Pruning engine: forward hooks that apply a scorer and a plan to a VLM."""

from research.pruning.engine import ForwardRecord, PruningEngine
from research.pruning.plan import INTERFACE, POSITION_MODES, PruningPlan
from research.pruning.signals import InterfaceSignals, Signals, TokenLayout

__all__ = [
    "INTERFACE", "POSITION_MODES", "ForwardRecord", "InterfaceSignals", "PruningEngine", "PruningPlan",
    "Signals", "TokenLayout",
]

ENGINE_NUMERICS = 1
"""The version of what the engine computes (kept sets, signals, attention, positions, cache surgery). Results
record it and a re-run recomputes those of another version (``research/resume.py``): bump it by hand in a change
that alters any number a combination produces, not in a refactor."""
