"""The deadline behind every freeze window.

The transaction arms a watchdog right before its first freeze and disarms it after
its last thaw. When the deadline passes first, the watchdog thaws every frozen
target itself. :class:`ThreadWatchdog` runs in the controller's process; the
:class:`Watchdog` protocol is the seam for one that lives in a process of its own
and also survives the controller's death.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol


class Watchdog(Protocol):
    def arm(self, deadline_s: float, on_expiry: Callable[[], None]) -> None:
        """Call ``on_expiry`` once ``deadline_s`` seconds pass without ``disarm``."""

    def disarm(self) -> None:
        """The window closed in time; ``on_expiry`` will not be called."""


class ThreadWatchdog:
    """A timer thread in the controller's own process."""

    def __init__(self) -> None:
        self._timer: threading.Timer | None = None

    def arm(self, deadline_s: float, on_expiry: Callable[[], None]) -> None:
        self.disarm()
        timer = threading.Timer(deadline_s, on_expiry)
        timer.daemon = True
        timer.name = "snapcore-deadline"
        self._timer = timer
        timer.start()

    def disarm(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
