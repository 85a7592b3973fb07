"""A sample's image, decoded from whatever the dataset holds; samples whose image does not decode are skipped."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class UndecodableImage(ValueError):
    """A sample's image cannot be decoded; the message names the sample and the file."""


def sample_image(sample: Any) -> Any:
    """The sample's image as a PIL image, from an array, a PIL image, encoded bytes, a file path or a lazy
    reference (an object with ``load()`` returning one of those, e.g. a row of a parquet snapshot)."""
    from PIL import Image

    image = sample.image
    if isinstance(image, Image.Image):
        return image
    if callable(getattr(image, "load", None)):
        reference, image = image, image.load()
        if isinstance(image, bytes):
            return _decode(sample, io.BytesIO(image), f"{len(image)} encoded bytes at {reference}")
    if not isinstance(image, (str, Path, bytes)):
        return Image.fromarray(np.asarray(image))
    source = f"file {image}" if isinstance(image, (str, Path)) else f"{len(image)} encoded bytes"
    return _decode(sample, io.BytesIO(image) if isinstance(image, bytes) else image, source)


def _decode(sample: Any, file: Any, source: str) -> Any:
    from PIL import Image

    try:
        with Image.open(file) as opened:
            opened.load()  # decode now: a truncated file fails here, not inside the processor
            return opened.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise UndecodableImage(f"sample {sample.id}: image ({source}) cannot be decoded: {error}") from None


def decodable(samples: Sequence[Any], skipped: list[str]) -> tuple[list[Any], list[Any]]:
    """(samples, images) of the samples whose image decodes; the others are logged and their ids added
    to ``skipped``."""
    kept, images = [], []
    for sample in samples:
        try:
            images.append(sample_image(sample))
            kept.append(sample)
        except UndecodableImage as error:
            logging.getLogger(__name__).warning("skipping %s", error)
            skipped.append(sample.id)
    return kept, images
