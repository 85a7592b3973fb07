"""Vision-token scorers: ``from scorers import SCORERS``; one file per scorer, registered by decorator."""

# Importing the modules registers their entries.
from scorers import atp, fastv, mixture, pdrop, random_scorer, static_prompt, text_prior  # noqa: E402,F401
from scorers.base import SCORERS, Scorer

__all__ = ["SCORERS", "Scorer"]
