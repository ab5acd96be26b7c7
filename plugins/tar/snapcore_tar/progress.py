"""Progress of an export: a bar on a terminal, plain log lines anywhere else.

The bar (bytes, files, rate, and a percentage when the totals are known) is drawn
on stderr only when both stdout and stderr are terminals: ``snapcore checkpoint
--json | jq`` or a log file gets log lines only. ``SNAPCORE_PROGRESS=never``
(or ``0``) turns the bar off, ``always`` (or ``1``) forces it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

from snapcore import human_bytes

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Redraw at most this often (seconds); log a line this often when there is no bar.
REDRAW_S = 0.1
LOG_EVERY_S = 30.0


def bar_wanted(stream: TextIO) -> bool:
    setting = os.environ.get("SNAPCORE_PROGRESS", "auto").strip().lower()
    if setting in ("never", "0", "no", "off"):
        return False
    if setting in ("always", "1", "yes", "on"):
        return True
    try:
        return stream.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts bytes and files of one export; thread-safe, cheap to update."""

    def __init__(
        self,
        label: str,
        *,
        total_bytes: int | None = None,
        total_files: int | None = None,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.label = label
        self.total_bytes = total_bytes or None
        self.total_files = total_files or None
        self.stream = stream if stream is not None else sys.stderr
        self.bar = bar_wanted(self.stream) if bar is None else bar
        self.bytes = 0
        self.files = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._drawn = 0.0
        self._logged = self.start
        self._width = 0
        log.info("%s: started", label)

    def add(self, *, nbytes: int = 0, files: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.files += files
        self._tick()

    def set_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.bytes = nbytes
        self._tick()

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        return self.bytes / elapsed

    def line(self) -> str:
        text = f"{self.label}: {human_bytes(self.bytes)}, {self.files:,} files, {human_bytes(self.rate())}/s"
        if self.total_bytes:
            pct = min(100.0, 100.0 * self.bytes / self.total_bytes)
            filled = int(pct / 5)
            text += f" [{'#' * filled}{'.' * (20 - filled)}] {pct:3.0f}%"
        elif self.total_files:
            text += f" ~{min(100.0, 100.0 * self.files / self.total_files):3.0f}%"
        return text

    def _tick(self) -> None:
        now = time.monotonic()
        if self.bar:
            if now - self._drawn >= REDRAW_S:
                self._drawn = now
                self._draw()
        elif now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.info("%s", self.line())

    def _draw(self, final: bool = False) -> None:
        text = self.line()
        pad = max(0, self._width - len(text))
        self._width = len(text)
        try:
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self.stream.flush()
        except (OSError, ValueError):
            self.bar = False

    def close(self, ok: bool) -> None:
        """Finish the bar (or log the summary line)."""
        if self.bar:
            self._draw(final=True)
        elapsed = time.monotonic() - self.start
        if ok:
            log.info("%s: done, %s in %.2f s", self.label, self.line().split(": ", 1)[1], elapsed)
        else:
            log.info("%s: failed after %.2f s", self.label, elapsed)
