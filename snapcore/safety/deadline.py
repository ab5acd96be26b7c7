"""The deadline behind every freeze window.

The transaction starts a watchdog while preparing, arms it right before its first
freeze and disarms it after its last thaw. When the deadline passes first, the
watchdog thaws every frozen target itself. :class:`ThreadWatchdog` runs in the
controller's own process; :class:`ProcessWatchdog` tells the guard process, which
also survives the controller's death.
"""

from __future__ import annotations

import _socket  # not socket: importing that costs ~1.6 ms of the CLI's start (its enums)
import array
import contextlib
import heapq
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from snapcore.errors import GuardError
from snapcore.types import Rescue, RescueKind


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


class _Timers:
    """One deadline thread per process, shared by every checkpoint in it.

    Started while preparing the first checkpoint, never when a window opens: a
    thread starting up on the other CPU while a filesystem freezes was measured to
    lengthen the kernel's RCU wait inside FIFREEZE from ~23 ms to ~40 ms; starting
    one per checkpoint cost ~0.3 ms.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._next = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="snapcore-deadline", daemon=True)
                self._thread.start()

    def arm(self, delay_s: float, callback: Callable[[], None]) -> int:
        self.start()
        with self._cond:
            token = next(self._next)
            heapq.heappush(self._heap, (time.monotonic() + delay_s, token, callback))
            self._cond.notify()
            return token

    def cancel(self, token: int) -> None:
        with self._cond:
            if any(t == token for _, t, _ in self._heap):
                self._cancelled.add(token)
            # no notify: the thread wakes at the old deadline, finds nothing, sleeps on

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._cond.wait()
                    continue
                left = self._heap[0][0] - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                _, _, callback = heapq.heappop(self._heap)
                self._cond.release()
                try:
                    callback()
                except Exception:  # said, but it must not end the deadlines of others
                    import logging

                    logging.getLogger("snapcore").exception("the deadline's thaw failed")
                finally:
                    self._cond.acquire()

    def _after_fork(self) -> None:
        self.__init__()  # type: ignore[misc]  # the thread did not come along


_TIMERS = _Timers()
os.register_at_fork(after_in_child=_TIMERS._after_fork)


class ThreadWatchdog:
    """A deadline in the controller's own process (the shared deadline thread)."""

    def __init__(self) -> None:
        self._token: int | None = None

    def watch(self, rescues: Mapping[str, Rescue]) -> None:
        return None  # in the controller's own process: it thaws through the hooks

    def freezing(self, *keys: str) -> None:
        return None

    def thawed(self, *keys: str) -> None:
        return None

    def start(self) -> None:
        _TIMERS.start()

    def arm(self, deadline_s: float, on_expiry: Callable[[], None]) -> None:
        self.disarm()
        self._token = _TIMERS.arm(deadline_s, on_expiry)

    def disarm(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            _TIMERS.cancel(token)

    def stop(self) -> None:
        self.disarm()


class GuardLink:
    """This process's connection to its guard process (:mod:`snapcore.safety.guard`).

    Started with the first checkpoint and kept for the next ones. The guard is
    forked (under a millisecond) while the only other threads are snapcore's own
    idle ones and the process is small, else started as a fresh interpreter
    (``posix_spawn``: nothing is copied). The ``snapcore`` command starts it as an
    interpreter at once (:func:`start_guard`), so that it boots on the other CPU
    while the command loads; a fork would cost the command ~2 ms in page copies.
    A forked guard shares its parent's memory copy-on-write; forking only a small
    process bounds what a long-lived controller could make it copy.
    """

    #: Fork only a process this small (resident); else start an interpreter.
    FORK_MAX_RSS = 64 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sock: _socket.socket | None = None
        self.pid: int | None = None

    def ensure(self, spawn: bool = False) -> None:
        """Have a guard; ``spawn``: start it as an interpreter, never by forking."""
        with self._lock:
            if self.sock is None:
                self._start(spawn)

    def _start(self, spawn: bool = False) -> None:
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            if not spawn and _only_our_threads() and _rss() <= self.FORK_MAX_RSS:
                from snapcore.safety import guard as guard

                self.pid = guard.fork(ours, theirs)
            else:  # the guard's module is not imported here: the interpreter runs it
                self.pid = os.posix_spawn(
                    sys.executable,
                    [sys.executable, "-I", "-S", _GUARD_SCRIPT],
                    os.environ,
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, theirs.fileno(), 0),
                        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                    ],
                    setsid=True,
                )
        except OSError as exc:
            ours.close()
            raise GuardError(f"cannot start the guard process ({sys.executable}): {exc}") from exc
        finally:
            theirs.close()
        self.sock = ours

    def _drop(self) -> None:
        """The guard is gone (or we are a forked child): forget it, reap it."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, os.WNOHANG)
        self.pid = None

    def send(self, msg: Mapping[str, object], fds: Sequence[int] = (), restart: bool = False, ack: float = 0.0) -> None:
        """Send one message; with ``restart``, a guard found dead is started anew once;
        with ``ack``, wait that many seconds at most for the guard's ``ok``."""
        if ack:
            msg = {**msg, "ack": True}
        data = json.dumps(msg).encode()
        with self._lock:
            for attempt in (0, 1):
                if self.sock is None:
                    if not (restart or attempt):
                        raise GuardError("the guard process is not running")
                    self._start()
                assert self.sock is not None
                try:
                    if fds:
                        self.sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))])
                    else:
                        self.sock.send(data)
                    if ack:
                        self._await_ok(ack)
                    return
                except OSError as exc:
                    self._drop()
                    if not restart or attempt:
                        raise GuardError(f"the guard process is gone: {exc}") from exc

    def _await_ok(self, timeout: float) -> None:
        sock = self.sock
        assert sock is not None
        sock.settimeout(timeout)
        try:
            answer = sock.recv(64)
            why = "closed its socket"
        except TimeoutError:
            answer, why = b"", f"did not answer within {timeout:g}s"
        finally:
            if self.sock is sock:
                sock.settimeout(None)
        if answer != b"ok":
            self._drop()
            raise GuardError(f"the guard process {why}: nothing is frozen without it")

    def _after_fork(self) -> None:
        # a forked child must not keep our guard's socket open: the guard would not
        # see our death; the child starts a guard of its own if it checkpoints
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.__init__()  # type: ignore[misc]


_LINK = GuardLink()
os.register_at_fork(after_in_child=_LINK._after_fork)


def start_guard() -> None:
    """Start this process's guard now, as an interpreter, so that it is up by the
    time a checkpoint needs it (the ``snapcore`` command calls this first).

    The deadline thread starts first, while the other CPU is still idle: started
    once the guard boots there, it was measured to wait up to ~4 ms for a CPU.
    """
    _TIMERS.start()
    _LINK.ensure(spawn=True)


class ProcessWatchdog:
    """The guard process thaws this checkpoint's targets if the controller dies.

    Told the targets (with a directory descriptor of each mount to thaw by) before
    the first freeze, and of every freeze and thaw. The socket closing (the
    controller died, even by SIGKILL) or the deadline passing makes it thaw every
    target of this checkpoint still frozen. The controller's own deadline thread
    stays behind it: two safety nets. The targets wait for the guard's answer (it
    holds them before anything is frozen); a guard that died since fails the next
    send, which comes before any freeze.
    """

    _ids = itertools.count()

    def __init__(self, record: str | None = None, link: GuardLink | None = None) -> None:
        self.record = record
        self.link = link or _LINK
        self.cp = f"{os.getpid()}.{next(self._ids)}"
        self._local = ThreadWatchdog()
        self._begun = False
        #: The deadline, told to the guard with the first freeze after ``arm``.
        self._arm_at: float | None = None

    def start(self) -> None:
        self.link.ensure()
        self._local.start()

    def watch(self, rescues: Mapping[str, Rescue]) -> None:
        """Hand the guard every target it may have to thaw, with a descriptor for
        each that needs one (a directory of a mount to FITHAW, a copy of a fanotify
        group's), in the targets' order."""
        with_fd = [(key, r) for key, r in rescues.items() if r.kind in _WITH_FD]
        others = [{"key": key, **r.to_json()} for key, r in rescues.items() if r.kind not in _WITH_FD]
        chunks: list[list[tuple[str, Rescue]]] = [with_fd[i : i + MAX_FDS] for i in range(0, len(with_fd), MAX_FDS)]
        for n, chunk in enumerate(chunks or [[]]):
            fds: list[int] = []
            try:
                for key, rescue in chunk:
                    fds.extend(_descriptors_for(key, rescue))
                targets = [{"key": key, **r.to_json(), **_fd_count(r)} for key, r in chunk]
                targets += others if n == 0 else []
                msg = {"op": "targets", "cp": self.cp, "record": self.record, "targets": targets}
                self.link.send(msg, fds, restart=not self._begun, ack=ACK_TIMEOUT_S)
                self._begun = True
            finally:
                for fd in fds:
                    os.close(fd)

    def _send(self, **msg: object) -> None:
        self.link.send({"cp": self.cp, **msg}, restart=not self._begun)
        self._begun = True

    def freezing(self, *keys: str) -> None:
        """Not answered: the message waits in the socket, so a guard that reads it
        after our death still thaws (an answer would cost a round trip inside the
        window for nothing)."""
        msg: dict[str, object] = {"cp": self.cp, "op": "freezing", "keys": list(keys)}
        if self._arm_at is not None:  # the deadline goes with the first freeze: one wake-up
            msg["at"], self._arm_at = self._arm_at, None
        self.link.send(msg, restart=not self._begun)
        self._begun = True

    def thawed(self, *keys: str) -> None:
        self._send(op="thawed", keys=list(keys))

    def arm(self, deadline_s: float, on_expiry: Callable[[], None]) -> None:
        self._local.arm(deadline_s, on_expiry)
        self._arm_at = time.monotonic() + deadline_s

    def disarm(self) -> None:
        self._local.disarm()
        self._arm_at = None
        with contextlib.suppress(GuardError):
            self._send(op="disarm")

    def stop(self) -> None:
        self._local.stop()
        if self._begun:
            with contextlib.suppress(GuardError):
                self.link.send({"op": "end", "cp": self.cp})
            self._begun = False


#: Rescues that travel with a descriptor (in the guard, popped in the targets' order).
_WITH_FD = (RescueKind.FITHAW, RescueKind.FANOTIFY)


def _descriptors_for(key: str, rescue: Rescue) -> list[int]:
    """The descriptors the guard gets for this rescue (ours to close once sent)."""
    fds: list[int] = []
    try:
        if rescue.kind is RescueKind.FANOTIFY:
            if not rescue.fds:
                raise GuardError(f"{key}: a fanotify rescue without its descriptor")
            for fd in rescue.fds:
                fds.append(os.dup(fd))
        else:
            fds.append(os.open(str(rescue.path), _DIR_FLAGS))
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise GuardError(f"cannot open {rescue.path or key} for the guard: {exc}") from exc
    return fds


def _fd_count(rescue: Rescue) -> dict[str, int]:
    """How many descriptors travel with a target, when not one."""
    return {"fds": len(rescue.fds)} if rescue.kind is RescueKind.FANOTIFY else {}


_GUARD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: How long the guard may take to answer that it holds the targets (a fresh
#: interpreter starts in ~15 ms; a loaded machine may take much longer).
ACK_TIMEOUT_S = 10.0
MAX_FDS = 200  # per message: the kernel's SCM_MAX_FD is 253


def _rss() -> int:
    """Resident bytes of this process (os.read: a text file object costs ~0.15 ms)."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return int(os.read(fd, 256).split()[1]) * os.sysconf("SC_PAGE_SIZE")
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return 1 << 62


def _only_our_threads() -> bool:
    """True when every other thread is one of snapcore's own (idle between
    checkpoints), so a fork inherits no lock someone else holds."""
    me = threading.current_thread()
    return all(t is me or t.name.startswith("snapcore") for t in threading.enumerate())
