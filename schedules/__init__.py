"""Pruning schedules and the budget solver: ``from schedules import SCHEDULES, solve_budget``.

One file per schedule, registered by decorator; importing the modules registers their entries.
"""

from schedules import changepoint, layers, random_layers, single, uniform  # noqa: F401
from schedules.base import SCHEDULES, Schedule
from schedules.budget import COUNTING, Budget, solve_budget

__all__ = ["COUNTING", "SCHEDULES", "Budget", "Schedule", "solve_budget"]
