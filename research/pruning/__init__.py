"""Pruning engine: forward hooks that apply a scorer and a plan to a VLM."""

from research.pruning.engine import ForwardRecord, PruningEngine
from research.pruning.plan import INTERFACE, POSITION_MODES, PruningPlan
from research.pruning.signals import InterfaceSignals, Signals, TokenLayout

__all__ = [
    "INTERFACE", "POSITION_MODES", "ForwardRecord", "InterfaceSignals", "PruningEngine", "PruningPlan",
    "Signals", "TokenLayout",
]
