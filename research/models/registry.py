"""Models by name: ``shapes`` is the shipped offline default; every family name loads a local checkpoint.

``model=qwen2_vl model.path=/data/Qwen2-VL-7B-Instruct``: the family is read from the checkpoint's
``config.json`` (:func:`inspect_checkpoint`) and must match the name given (``model=auto`` accepts any).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from research.models.base import (
    FAMILIES,
    UnsupportedModel,
    VisionLayout,
    VLMAdapter,
    family_of_config,
    vision_merging_refusal,
)
from research.registry import Registry
from research.storage import weights_digest

MODELS: Registry[Any] = Registry("model")
ASSETS = Path(__file__).resolve().parent.parent / "assets"
AUTO = "auto"


@MODELS.register("shapes")
def shapes_path(path: str | None = None) -> Path:
    """The offline default trained by ``python -m research.train_offline_model`` and shipped in the repo."""
    return Path(path) if path else ASSETS / "shapes"


def _local_checkpoint(name: str) -> Any:
    def directory(path: str | None = None) -> Path:
        if not path:
            raise ValueError(f"model {name} needs model.path=<local Hugging Face checkpoint directory>")
        return Path(path)

    directory.__doc__ = f"A local ``{name}`` checkpoint directory: ``model={name} model.path=...``."
    return directory


for _name in [AUTO, *FAMILIES.names()]:
    MODELS.register(_name)(_local_checkpoint(_name))


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint's ``config.json`` says, read once and without weights: its family and its shape."""

    directory: Path
    adapter: type[VLMAdapter]
    layout: VisionLayout  # decoder layers, image tokens a budget is planned against

    def cache_key(self, *parts: str) -> str:
        """A key for what is derived from this checkpoint and ``parts``: it follows the checkpoint's path, its
        config.json and its weights (``weights_digest``: a retrain in place is a new key), for a shift histogram's
        cache, per dataset, split and N."""
        config = (self.directory / "config.json").read_bytes()
        weights = weights_digest(self.directory).encode()
        return hashlib.sha256(b"|".join([str(self.directory.resolve()).encode(), config, weights,
                                         *(part.encode() for part in parts)])).hexdigest()[:16]


def inspect_checkpoint(name: str, path: str | Path | None = None) -> Checkpoint:
    """The family and shape of model ``name``'s checkpoint (``path``: a local directory) from its ``config.json``,
    read once and then through ``transformers.AutoConfig`` (which fills the defaults a config.json may leave out).

    Raises UnsupportedModel, one line: no checkpoint there, a class no family covers or one other than ``name``'s,
    or a config.json that is not a usable model config (AutoConfig would silently fill in a 7B LLaMA and a default
    vision tower where ``text_config`` or ``vision_config`` is missing).
    """
    directory = MODELS.get(name)(str(path) if path is not None else None)
    if not (directory / "config.json").is_file():
        raise UnsupportedModel(f"model path {str(directory)!r} holds no config.json: expected a local Hugging Face "
                               "checkpoint")
    if not any(directory.glob("*.safetensors")):
        raise UnsupportedModel(f"model path {str(directory)!r} holds no *.safetensors weights: expected a local "
                               "Hugging Face checkpoint (config.json + *.safetensors)")
    try:
        raw = json.loads((directory / "config.json").read_text())
        adapter = family_of_config(raw)
        if name not in (AUTO, "shapes") and name in FAMILIES and adapter.family != name:
            raise UnsupportedModel(f"model={name} but {directory / 'config.json'} holds a {adapter.model_class} "
                                   f"(family {adapter.family}); use model={adapter.family} or model=auto")
        missing = [key for key in ("text_config", "vision_config") if key not in raw]
        if missing:
            raise KeyError(f"no {' or '.join(missing)}")
        config = _auto_config(directory)
        adapter.check_config(config)
        return Checkpoint(directory, adapter, adapter.vision_layout(config))
    except UnsupportedModel:
        raise
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        first = " ".join(str(error).split())[:300]
        raise UnsupportedModel(f"{directory / 'config.json'} is not a usable model config ({type(error).__name__}: "
                               f"{first})") from None


def check_scorers(adapter: type[VLMAdapter], scorers: Iterable[Any]) -> None:
    """Refuse, in one line (UnsupportedModel), a scorer entry (``research.specs.ScorerSpec``) family ``adapter``
    cannot run: one that ranks by the vision tower's CLS attention (or reads its patch states) where the family does
    not map it onto its image tokens, one that merges inside the vision tower where the family cannot hand a shorter
    image span on, or compact positions where the family cannot renumber them (``compact_positions_refusal``)."""
    for scorer in scorers:
        if scorer.component.needs_vision_merging and not adapter.supports_vision_merging:
            raise UnsupportedModel(vision_merging_refusal(adapter, scorer.name))
        if scorer.component.needs_cls_saliency and not adapter.has_cls_saliency:
            raise UnsupportedModel(
                f"scorer {scorer.name!r} ranks by the vision tower's CLS attention, which {adapter.family} "
                f"({adapter.model_class}) does not map onto its image tokens; drop it or use a model of family "
                f"{[f for f in FAMILIES.names() if FAMILIES.get(f).has_cls_saliency]}"
            )
        if scorer.component.needs_clip_patches and not adapter.has_cls_saliency:
            raise UnsupportedModel(
                f"scorer {scorer.name!r} reads the vision tower's patch states as the image tokens one to one, which "
                f"{adapter.family} ({adapter.model_class}) does not give (merged, cropped or CLS-less patches); drop "
                f"it or use a model of family {[f for f in FAMILIES.names() if FAMILIES.get(f).has_cls_saliency]}"
            )
        if scorer.positions == "compact" and adapter.compact_positions_refusal() is not None:
            raise UnsupportedModel(adapter.compact_positions_refusal())


def _auto_config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_model(
    name: str = "shapes",
    path: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[VLMAdapter, Any]:
    """(adapter, processor) of the model called ``name``; never downloads."""
    checkpoint = inspect_checkpoint(name, path)
    return checkpoint.adapter.from_pretrained(
        checkpoint.directory, dtype=dtype, attn_implementation=attn_implementation, device=device
    )
