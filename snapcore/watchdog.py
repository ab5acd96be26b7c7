"""The deadline behind every freeze window.

The transaction starts a watchdog while preparing, arms it right before its first
freeze and disarms it after its last thaw. When the deadline passes first, the
watchdog thaws every frozen target itself. :class:`ThreadWatchdog` runs in the
controller's own process; the :class:`Watchdog` protocol is the seam for one that
lives in a process of its own and so also survives the controller's death.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from snapcore.errors import SnapcoreError
from snapcore.types import Rescue


class Watchdog(Protocol):
    def start(self) -> None:
        """Get ready (before anything is frozen): start threads or processes now."""

    def watch(self, rescues: Mapping[str, Rescue]) -> None:
        """Before the first freeze: how to thaw each target (by key) without us."""

    def freezing(self, *keys: str) -> None:
        """Right before the targets ``keys`` are frozen."""

    def thawed(self, *keys: str) -> None:
        """After the targets ``keys`` were thawed."""

    def arm(self, deadline_s: float, on_expiry: Callable[[], None]) -> None:
        """Call ``on_expiry`` once ``deadline_s`` seconds pass without ``disarm``."""

    def disarm(self) -> None:
        """The window closed in time; ``on_expiry`` will not be called."""

    def stop(self) -> None:
        """The checkpoint is over: release what ``start`` took."""


class ThreadWatchdog:
    """A thread in the controller's own process, started before the window.

    The thread is started while preparing, not when the window opens: a thread
    starting up on the other CPU while a filesystem freezes was measured to lengthen
    the kernel's RCU wait inside FIFREEZE from ~23 ms to ~40 ms.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._callback: Callable[[], None] | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None

    def watch(self, rescues: Mapping[str, Rescue]) -> None:
        return None  # in the controller's own process: it thaws through the hooks

    def freezing(self, *keys: str) -> None:
        return None

    def thawed(self, *keys: str) -> None:
        return None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="snapcore-deadline", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                callback, self._callback, self._deadline = self._callback, None, None
                if callback is not None:
                    self._cond.release()
                    try:
                        callback()
                    finally:
                        self._cond.acquire()

    def arm(self, deadline_s: float, on_expiry: Callable[[], None]) -> None:
        self.start()
        with self._cond:
            self._deadline = time.monotonic() + deadline_s
            self._callback = on_expiry
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._callback = None
            # no notify: the thread wakes at the old deadline, finds nothing, sleeps on

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._deadline = None
            self._callback = None
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None


class ProcessWatchdog:
    """The guard process (:mod:`snapcore.guard`): thaws on the controller's death.

    It is started at the beginning of the transaction, told the targets and how to
    thaw them before the first freeze, and told of every freeze and thaw. A pipe
    that closes (the controller died, even by SIGKILL) or a deadline that passes
    makes it thaw every target still frozen. The controller's own deadline thread
    stays behind it: two safety nets.

    The guard is forked while the controller runs no thread but its own idle ones
    (about 1 ms), else started as a fresh interpreter (about 14 ms, overlapping the
    resolving).
    """

    def __init__(self, record: str | None = None) -> None:
        self.record = record
        self.pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._to: int | None = None
        self._from: int | None = None
        self._local = ThreadWatchdog()
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._on_expiry: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.pid is None:
            from snapcore import guard

            if _only_our_threads():
                self.pid, self._to, self._from = guard.fork(self.record)
            else:
                argv = [sys.executable, "-I", "-S", guard.__file__]
                if self.record:
                    argv.append(self.record)
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd="/",
                )
                assert self.proc.stdin is not None and self.proc.stdout is not None
                self.pid, self._to, self._from = self.proc.pid, self.proc.stdin.fileno(), self.proc.stdout.fileno()
            self._reader = threading.Thread(target=self._read, name="snapcore-guard-reader", daemon=True)
            self._reader.start()
        self._local.start()

    def _read(self) -> None:
        buf = b""
        fd = self._from
        while fd is not None:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line == b"ready":
                    self._ready.set()
                elif line == b"expired":
                    callback = self._on_expiry
                    if callback is not None:
                        callback()

    def _send(self, **msg: object) -> None:
        if self._to is None:
            raise GuardError("the guard process is not running")
        data = (json.dumps(msg) + "\n").encode()
        with self._lock:
            try:
                os.write(self._to, data)
            except OSError as exc:
                raise GuardError(f"the guard process is gone: {exc}") from exc

    def watch(self, rescues: Mapping[str, Rescue], timeout: float = 10.0) -> None:
        """Hand the guard every target it may have to thaw; wait until it holds them."""
        self.start()
        self._send(op="targets", targets=[{"key": key, **r.to_json()} for key, r in rescues.items()])
        if not self._ready.wait(timeout):
            raise GuardError(f"the guard process did not get ready within {timeout:g}s")

    def freezing(self, *keys: str) -> None:
        self._send(op="freezing", keys=list(keys))

    def thawed(self, *keys: str) -> None:
        self._send(op="thawed", keys=list(keys))

    def arm(self, deadline_s: float, on_expiry: Callable[[], None]) -> None:
        self._on_expiry = on_expiry
        self._send(op="arm", deadline_s=deadline_s)
        self._local.arm(deadline_s, on_expiry)

    def disarm(self) -> None:
        self._local.disarm()
        self._on_expiry = None
        with contextlib.suppress(GuardError):
            self._send(op="disarm")

    def stop(self) -> None:
        self._local.stop()
        pid, self.pid = self.pid, None
        if pid is None:
            return
        with contextlib.suppress(GuardError):
            self._send(op="exit")
        to, self._to = self._to, None
        if self.proc is not None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            if to is not None:
                os.close(to)
            _reap(pid)
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self.proc is not None:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self.proc = None
        elif self._from is not None:
            os.close(self._from)
        self._from = None


def _only_our_threads() -> bool:
    """True when every other thread is one of snapcore's own (idle between
    checkpoints), so a fork inherits no lock someone else holds."""
    me = threading.current_thread()
    return all(t is me or t.name.startswith("snapcore") for t in threading.enumerate())


def _reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for the guard to exit (it does at once after ``exit``), killing it after
    ``timeout``: a pidfd wakes us the moment it is gone, no polling."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except OSError:  # already reaped, or no pidfd: fall back to a blocking wait
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    finally:
        os.close(fd)


class GuardError(SnapcoreError):
    """The guard process could not be started or reached: nothing is frozen without it."""
