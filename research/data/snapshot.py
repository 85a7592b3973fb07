"""Local snapshots of lmms-lab Hugging Face dataset repositories, read with pyarrow.

A snapshot is what ``huggingface-cli download lmms-lab/<name> --repo-type dataset --local-dir <dir>`` writes:
parquet shards ``<dir>/<config>/<split>-00000-of-0000N.parquet`` (``data/`` for the default config), each row
holding the task's fields and the image as ``{"bytes", "path"}``. Only the text columns are read up front;
an image is read (the column chunk of its row group) and decoded only when its batch is evaluated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class SnapshotError(ValueError):
    """A snapshot that cannot be read as the task expects; the message is one line naming what was expected."""


def snapshot_folder(name: str, folder: str, root: str | None, path: str | None) -> Path:
    """The snapshot directory of benchmark ``name``: ``path`` if given, else ``<root>/<folder>`` (any case)."""
    download = f"huggingface-cli download lmms-lab/{folder} --repo-type dataset --local-dir <root>/{folder}"
    if path:
        directory = Path(path).expanduser()
        if not directory.exists():
            raise SnapshotError(f"data.paths.{name}={path!r} does not exist; expected the snapshot of lmms-lab/"
                                f"{folder} ({download})")
        return directory
    if not root:
        raise SnapshotError(f"benchmark {name!r} needs data.root=<folder holding {folder}/> or data.paths.{name}="
                            f"<its snapshot folder> ({download})")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise SnapshotError(f"data.root={root!r} is not a directory; expected a folder holding {folder}/ ({download})")
    matches = [child for child in sorted(base.iterdir()) if child.is_dir() and child.name.lower() == folder.lower()]
    if not matches:
        raise SnapshotError(f"data.root={root!r} holds no {folder}/ snapshot for benchmark {name!r} ({download})")
    return matches[0]


def _config_dirs(directory: Path, config: str | None) -> list[Path]:
    return [directory / config] if config else [directory / "data", directory / "default", directory]


def shard_files(directory: Path, config: str | None, split: str) -> list[Path]:
    """The parquet shards of ``config`` / ``split``, sorted; a one-line error listing what is there otherwise."""
    for folder in _config_dirs(directory, config):
        files = sorted(folder.glob(f"{split}-*.parquet")) + sorted(folder.glob(f"{split}/*.parquet"))
        if files:
            return files
    where = f"{directory / (config or 'data')}/{split}-*.parquet"
    present = sorted(str(p.relative_to(directory)) for p in directory.rglob("*.parquet"))[:6]
    of_config = f" of config {config!r}" if config else ""
    raise SnapshotError(f"{directory}: no parquet shards for split {split!r}{of_config} (expected {where}); "
                        f"parquet files found: {present or 'none'}")


def read_columns(files: Sequence[Path], columns: Sequence[str], what: str) -> pa.Table:
    """The text ``columns`` of all ``files`` (no image bytes); a missing field is a one-line SnapshotError."""
    tables = []
    for file in files:
        try:
            names = pq.ParquetFile(file).schema_arrow.names
        except (OSError, pa.ArrowException) as error:
            raise SnapshotError(f"{what}: {file} is not a readable parquet file ({error})") from None
        missing = [c for c in columns if c not in names]
        if missing:
            raise SnapshotError(f"{what}: {file} has no field(s) {missing}; expected {list(columns)} "
                                f"(the fields lmms-eval's task reads), found {names}")
        tables.append(pq.read_table(file, columns=list(columns)))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class ImageColumn:
    """The image column of parquet shards, read one row group at a time on demand.

    Holds the encoded bytes of at most ``cache_groups`` row groups (the most recently used); nothing is decoded
    here (that is :func:`research.data.images.sample_image`, per batch).
    """

    def __init__(self, files: Sequence[Path], column: str = "image", what: str = "") -> None:
        self.files, self.column, self.cache_groups = list(files), column, 2
        self.index: list[tuple[int, int, int]] = []  # global row -> (file, row group, first global row of the group)
        self.file_starts: list[int] = []
        for f, file in enumerate(self.files):
            self.file_starts.append(len(self.index))
            meta = pq.ParquetFile(file)
            if column not in meta.schema_arrow.names:
                raise SnapshotError(f"{what}: {file} has no field {column!r}; found {meta.schema_arrow.names}")
            for group in range(meta.metadata.num_row_groups):
                start = len(self.index)
                self.index += [(f, group, start)] * meta.metadata.row_group(group).num_rows
        self._cache: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def bytes_at(self, row: int) -> bytes:
        """The encoded image of global row ``row`` (b"" when the row has none)."""
        f, group, start = self.index[row]
        key = (f, group)
        if key not in self._cache:
            table = pq.ParquetFile(self.files[f]).read_row_group(group, columns=[self.column])
            self._cache[key] = table.column(0).combine_chunks()
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        value: Any = self._cache[key][row - start].as_py()
        if isinstance(value, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        return value or b""

    def where(self, row: int) -> str:
        f = self.index[row][0]
        return f"row {row - self.file_starts[f]} of {self.files[f].name}"


class ImageRef:
    """A sample's image, still encoded in its snapshot: ``load()`` reads it (per batch, never up front).

    A plain class, not a dataclass: Lightning's batch transfer rebuilds dataclasses, this is left as it is."""

    __slots__ = ("column", "row")

    def __init__(self, column: ImageColumn, row: int) -> None:
        self.column, self.row = column, row

    def load(self) -> bytes:
        return self.column.bytes_at(self.row)

    def __str__(self) -> str:
        return self.column.where(self.row)

    def __repr__(self) -> str:
        return f"ImageRef({self})"
