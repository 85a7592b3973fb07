"""Vision-token scorers: ``from scorers import SCORERS``; one file per scorer, registered by decorator.

Importing the package imports every module in it (:func:`research.registry.discover`): a new scorer is one new file.
"""

from research.registry import discover
from scorers.base import SCORERS, Scorer

discover(__name__, __path__)

__all__ = ["SCORERS", "Scorer"]
