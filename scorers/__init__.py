"""Vision-token scorers: ``from scorers import SCORERS``; one file per scorer, registered by decorator."""

from scorers.base import SCORERS, Scorer

# Importing the modules registers their entries.
from scorers import fastv, pdrop, random_scorer, static_prompt, text_prior  # noqa: E402,F401

__all__ = ["SCORERS", "Scorer"]
