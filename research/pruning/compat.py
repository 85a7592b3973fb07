"""What the engine reads from the calls transformers makes, and a clear error when that changes.

The engine leans on as little of transformers as it can, and on nothing found by a keyword's name
that a release may rename:

* the KV cache is found by its type (any ``transformers.Cache`` among a call's arguments): 5.24
  renamed the keyword models pass it under from ``past_key_values`` to ``cache``;
* a cache is only asked ``get_seq_length()`` and ``is_compileable`` (static length), public since
  4.x (``get_mask_sizes`` changed its signature within 5.x, ``get_max_cache_shape`` was removed);
* the names it still reads are the documented inputs of a model and of a decoder layer
  (``input_ids``, ``inputs_embeds``, ``attention_mask``, ``position_ids``,
  ``position_embeddings``); :func:`required` fails with one line naming the installed version when
  one of them is missing.

:class:`TransformersChanged` is the one-line error for a pruned forward that fails inside
transformers: scorer, layer, installed version and the tested range.
"""

from __future__ import annotations

import functools
import re
import traceback
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import transformers
from transformers import Cache

_TRANSFORMERS_DIR = str(Path(transformers.__file__).resolve().parent)
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class TransformersChanged(RuntimeError):
    """A pruned forward failed inside transformers, or a call lacked an input the engine reads."""


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The KV cache passed to a module, found by type whatever keyword carries it."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def cached_length(cache: Cache | None) -> int:
    """Tokens already in the cache of decoder layer 0 (0 without a cache)."""
    return 0 if cache is None else int(cache.get_seq_length())


def is_static(cache: Cache | None) -> bool:
    """True for a cache of fixed length (StaticCache and kin): masks then span that length."""
    return bool(getattr(cache, "is_compileable", False))


def required(kwargs: dict, name: str, where: str) -> Any:
    """``kwargs[name]``, or a one-line :class:`TransformersChanged` naming the installed version."""
    if name not in kwargs or kwargs[name] is None:
        raise TransformersChanged(
            f"{where} was called without {name!r} (got {sorted(kwargs)}): transformers "
            f"{transformers.__version__} changed a call the pruning engine reads; tested range: {tested_range()}"
        )
    return kwargs[name]


def unsupported_call(what: str) -> TransformersChanged:
    """One line: ``what`` the engine met in a call, with the installed transformers and the tested range."""
    return TransformersChanged(f"{what} (transformers {transformers.__version__}, tested range {tested_range()})")


@functools.cache
def tested_range() -> str:
    """The transformers versions this project was tested with: its declared requirement."""
    try:
        requirements = metadata.requires("vtprune") or []
    except metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        match = re.match(r"transformers\s*([<>=!~,.\d\s]+)", requirement)
        if match:
            return match.group(1).replace(" ", "")
    return "see pyproject.toml"


def failed_inside_transformers(tb: TracebackType | None) -> bool:
    """True if the innermost Python frame outside torch belongs to transformers (not to our hooks)."""
    frames = [f.filename for f in traceback.extract_tb(tb)]
    outside_torch = [f for f in frames if not str(Path(f).resolve()).startswith(_TORCH_DIR)]
    return bool(outside_torch) and str(Path(outside_torch[-1]).resolve()).startswith(_TRANSFORMERS_DIR)


def failing_layer(tb: TracebackType | None, layers: Any) -> int | None:
    """Index of the innermost decoder layer (a module of ``layers``) running in traceback ``tb``."""
    index = {id(layer): i for i, layer in enumerate(layers)}
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in index:
            found = index[id(owner)]
        tb = tb.tb_next
    return found


def describe_failure(error: BaseException, scorer: Any, layer: int | None) -> TransformersChanged:
    """The one-line error for a pruned forward that ``error`` stopped inside transformers."""
    scorer_name = getattr(scorer, "registry_name", None) or type(scorer).__name__
    where = "outside the decoder layers" if layer is None else f"in decoder layer {layer}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return TransformersChanged(
        f"pruned forward (scorer {scorer_name}) failed inside transformers {where}: {first_line} -- "
        f"installed transformers {transformers.__version__}, tested range {tested_range()}"
    )
