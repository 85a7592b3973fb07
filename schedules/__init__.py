"""Pruning schedules and the budget solver: ``from schedules import SCHEDULES, solve_budget``.

One file per schedule, registered by decorator; importing the package imports every module in it
(:func:`research.registry.discover`): a new schedule is one new file.
"""

from research.registry import discover
from schedules.base import SCHEDULES, Schedule
from schedules.budget import COUNTING, Budget, solve_budget

discover(__name__, __path__)

__all__ = ["COUNTING", "SCHEDULES", "Budget", "Schedule", "solve_budget"]
