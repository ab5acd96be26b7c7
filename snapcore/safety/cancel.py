"""Cancelling a checkpoint: by a signal (SIGTERM, SIGINT) or by the caller.

A checkpoint has one :class:`Cancel`, shared by all of its targets
(``Target.cancel``). Setting it does two things: the transaction fails at its next
step, as on any failure (every target thawed, what was made discarded, a failed
manifest written, exit status 1); and the callbacks registered with
:meth:`Cancel.on_cancel` run at once, so that a backend blocked in a long command
(tar, rsync, btrfs send) stops it instead of finishing it.

A backend's child processes should also end when the controller is killed outright
(``kill -9``): :func:`tied_to_controller` starts them with a parent-death signal.
What such a child leaves half-written is removed by ``snapcore recover``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

from snapcore.errors import Cancelled

#: Signals that cancel a running ``snapcore checkpoint``.
CANCEL_SIGNALS = ("SIGTERM", "SIGINT")


class Cancel:
    """A one-way switch: once set, it stays set; callbacks run once each."""

    __slots__ = ("_callbacks", "_event", "_lock", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        # reentrant: a signal handler runs on the main thread, possibly while that
        # very thread is registering a callback
        self._lock = threading.RLock()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self.reason: str | None = None

    def __repr__(self) -> str:
        return f"Cancel({self.reason!r})" if self.is_set() else "Cancel()"

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, reason: str) -> None:
        """Cancel (the first reason is kept) and run every registered callback."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            self._event.set()
            callbacks = list(self._callbacks.values())
            self._callbacks.clear()
        for callback in callbacks:
            with contextlib.suppress(Exception):  # a process already gone, say
                callback()

    def check(self) -> None:
        """Raise :class:`~snapcore.errors.Cancelled` once cancelled."""
        if self._event.is_set():
            raise Cancelled(f"cancelled ({self.reason})")

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    @contextlib.contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call ``callback`` if the checkpoint is cancelled during the ``with`` body
        (at once when it already is). It may run on another thread or in a signal
        handler: keep it to a ``kill``."""
        key = id(callback)
        with self._lock:
            now = self._event.is_set()
            if not now:
                self._callbacks[key] = callback
        if now:
            with contextlib.suppress(Exception):
                callback()
        try:
            yield
        finally:
            with self._lock:
                self._callbacks.pop(key, None)


@contextlib.contextmanager
def on_signals(cancel: Cancel, signals: Sequence[str] = CANCEL_SIGNALS) -> Iterator[None]:
    """Turn ``signals`` (names) into a cancellation for the body of the ``with``
    (main thread only; elsewhere it does nothing). The previous handlers come back
    after it."""
    import signal  # here: the CLI's start does not need it

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        first = not cancel.is_set()
        cancel.set(f"{name} received")
        if first:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"snapcore: {name}: cancelling the checkpoint (thawing, removing what it made)\n")
                sys.stderr.flush()

    previous = {s: signal.signal(getattr(signal, s), handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(getattr(signal, s), old)


def tied_to_controller(argv: Sequence[str]) -> list[str]:
    """``argv``, started so that it gets SIGKILL when the thread that starts it dies
    (util-linux ``setpriv --pdeathsig``): an exporter's tar or rsync must not go on
    writing for a controller that was killed. Unchanged where setpriv is missing."""
    setpriv = _setpriv()
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv)


_SETPRIV: list[str | None] = []


def _setpriv() -> str | None:
    if not _SETPRIV:
        import shutil

        found = shutil.which("setpriv", path=os.defpath + ":/usr/bin:/bin")
        _SETPRIV.append(found)
    return _SETPRIV[0]
