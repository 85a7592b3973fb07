"""Datasets: ``from research.data import DATASETS``; one module per dataset, registered by decorator.

``shapes`` (synthetic, offline) and the benchmarks read from local lmms-lab snapshots: ``mme``, ``gqa``,
``mmbench``, ``scienceqa_img``, ``textvqa``, ``pope``, ``vqav2``, plus ``vqa_jsonl`` (your own data).
Importing the package imports every module in it (:func:`research.registry.discover`): a new benchmark is one
new file. A module's own names are imported from it (``from research.data.shapes import ShapesVQA``).
"""

from research.registry import Registry, discover

DATASETS: Registry[type] = Registry("dataset")

# The modules import DATASETS from here, so it comes first. ``fixtures`` is a script
# (``python -m research.data.fixtures``), which runpy warns about when the package has imported it already.
discover(__name__, __path__, skip=("fixtures",))

__all__ = ["DATASETS"]
