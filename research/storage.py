"""Files a run writes and later reads: atomic writes, tolerant reads, the weights' digest and a directory lock.

* Every file a later run reads is replaced atomically (temporary file, flush, fsync, rename): a kill
  leaves the old complete file or the new one, never a truncated one.
* A file that cannot be parsed anyway (written by something else, or damaged) is reported in one
  warning line and recomputed, never fatal.
* An ``OSError`` while writing (disk full, permissions) becomes :class:`StopSweep`: one line naming
  the path and what was kept.
* :class:`OutputLock` keeps two runs out of one output directory; the run holding it first removes the
  temporary files a killed run left (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StopSweep(RuntimeError):
    """The sweep cannot go on (a write failed, or the output directory is in use); one-line message."""


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically; an ``OSError`` raises :class:`StopSweep` naming the path."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # a failed write, or a stop signal mid-write: no temporary file stays
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise StopSweep(f"cannot write {path}: {error.strerror or error}") from error
        raise


TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")  # write_atomic's ".<name>.<pid>.tmp"


def remove_stale_temporaries(directory: Path, locked: bool) -> None:
    """Remove the temporary files that a killed :func:`write_atomic` left under ``directory``: every one when
    this process holds ``directory``'s lock and has written nothing yet, else those of processes now gone."""
    for path in directory.rglob(".*.tmp"):
        match = TEMPORARY.fullmatch(path.name)
        if match and (locked or not process_alive(int(match.group(1)))):
            with contextlib.suppress(OSError):
                path.unlink()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def read_json(path: Path, what: str) -> dict | None:
    """The JSON object in ``path``; None (with one warning line) if it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return data
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("ignoring unreadable %s %s (%s); it will be recomputed", what, path, str(error).splitlines()[0])
        return None


def weights_digest(directory: Path, chunk: int = 1 << 20) -> str:
    """A cheap fingerprint of a checkpoint: config.json, and each weight file's size, first and last MiB.

    Retraining or swapping weights changes it; copying or touching the files does not (no mtimes).
    """
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(directory)}:{size}".encode())
            with path.open("rb") as f:
                digest.update(f.read(chunk))
                if size > chunk:
                    f.seek(max(chunk, size - chunk))
                    digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


class OutputLock:
    """An exclusive lock on ``<directory>/.lock`` for the life of a run (released by the OS on exit).

    A run that ends in an error (a bad dataset, a stop signal) before writing anything into a directory the
    lock created leaves no directory behind."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"
        self._file: Any = None
        self._created: list[Path] = []  # the directories __enter__ made, innermost first

    def __enter__(self) -> OutputLock:
        self._created = [d for d in [self.path.parent, *self.path.parent.parents] if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StopSweep(
                f"output directory {self.path.parent} is in use by {holder}; wait for it to finish or choose "
                "another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        if self._file is not None:
            if kind is not None and self._created and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
                self.path.unlink()  # while still held: nobody takes a lock on a file about to vanish
                for directory in self._created:
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
