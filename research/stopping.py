"""Stop signals: SIGTERM (``timeout``, SLURM, ``docker stop``, systemd) and SIGINT (Ctrl-C) end a sweep at once.

:func:`stop_on_signals` makes either signal raise :class:`StopSignal` in the main thread, wherever the run is
(loading, inside a combination's predict loop, writing): the exception unwinds through Lightning's predict loop
(Lightning's own SIGTERM handler only sets a flag its predict loop never reads, and runs ours after it) and the
sweep's ``finally`` blocks, so what finished is kept, no partial file stays (:func:`research.storage.write_atomic`
removes its temporary file), the output directory's lock is released and ``main`` prints one line and exits
128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second signal while stopping ends the process
at once, as the signal's default action does.

Every process of a ``trainer.devices=N`` run installs it (each copy runs ``main``, and a signal sent to the
process group, as Ctrl-C, ``timeout`` and SLURM do, reaches each); only rank 0 prints the line.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal(BaseException):
    """A stop signal arrived; not an ``Exception``, so no ``except Exception`` records it as a failure.

    ``progress`` (set by the sweep) says what finished and where it is kept."""

    def __init__(self, signum: int, progress: str = "") -> None:
        self.signum, self.progress = signum, progress
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        """``stopped by SIGTERM: <progress>; run the same command again to resume``."""
        progress = f": {self.progress}" if self.progress else " before any combination ran"
        return f"stopped by {signal.Signals(self.signum).name}{progress}; run the same command again to resume"


def finished_line(results: list[dict], out: Path, total: int | None = None) -> str:
    """``3 of 11 combinations finished (kept in <out>/results)``: the results (or summary rows) with status ok,
    of ``total`` (default: all of them)."""
    finished = sum(r.get("status") == "ok" for r in results)
    return f"{finished} of {len(results) if total is None else total} combinations finished (kept in {out / 'results'})"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`StopSignal` (once; a second one kills at once)."""
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:  # impatient: the signal's default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stopping = True
        raise StopSignal(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
