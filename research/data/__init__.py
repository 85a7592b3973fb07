"""Datasets: ``from research.data import DATASETS``; one module per dataset, registered by decorator.

``shapes`` (synthetic, offline) and the benchmarks read from local lmms-lab snapshots: ``mme``, ``gqa``,
``mmbench``, ``scienceqa_img``, ``textvqa``, ``pope``, ``vqav2``, plus ``vqa_jsonl`` (your own data).
A module's own names are imported from it (``from research.data.shapes import ShapesVQA``).
"""

from research.registry import Registry

DATASETS: Registry[type] = Registry("dataset")

# Importing the modules registers their entries (they import DATASETS from here, so it comes first).
from research.data import gqa, mmbench, mme, pope, scienceqa_img, shapes, textvqa, vqa_jsonl, vqav2  # noqa: E402,F401

__all__ = ["DATASETS"]
