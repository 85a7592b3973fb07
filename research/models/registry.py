"""Models by name: ``shapes`` is the shipped offline default; every family name loads a local checkpoint.

``model=qwen2_vl model.path=/data/Qwen2-VL-7B-Instruct``: the family is read from the checkpoint's
``config.json`` (:func:`checkpoint_family`) and must match the name given (``model=auto`` accepts any).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from research.models.base import FAMILIES, UnsupportedModel, VLMAdapter, family_of_config
from research.registry import Registry

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


def checkpoint_family(path: Path, name: str = AUTO) -> type[VLMAdapter]:
    """The adapter for the checkpoint in ``path``, from its ``config.json`` alone (no weights).

    Raises UnsupportedModel (one line) for a class no family covers, or one other than ``name``'s.
    """
    raw = json.loads((path / "config.json").read_text())
    adapter = family_of_config(raw)
    if name not in (AUTO, "shapes") and name in FAMILIES and adapter.family != name:
        raise UnsupportedModel(f"model={name} but {path / 'config.json'} holds a {adapter.model_class} "
                               f"(family {adapter.family}); use model={adapter.family} or model=auto")
    adapter.check_config(_auto_config(path))
    return adapter


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
    directory = MODELS.get(name)(path)
    return checkpoint_family(directory, name).from_pretrained(
        directory, dtype=dtype, attn_implementation=attn_implementation, device=device
    )
