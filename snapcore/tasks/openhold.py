"""Holding back writes to the files the tasks need while they are frozen
(``on_change: delay`` or ``deny``: the seed's "delay/deny changes, fanotify only").

A fanotify group of class ``FAN_CLASS_CONTENT`` puts an **inode mark** with
``FAN_OPEN_PERM`` on each needed regular file of a mount whose rule says ``delay`` or
``deny``. The kernel then asks us before any process opens one of those inodes, by
any name (hard links, another mount namespace's path), and asks nothing about any
other file: an unrelated open on the filesystem never waits for this process (a
mount or filesystem mark would make every open on it a round trip through here).

The permission event does not carry the opener's open flags. The opener is blocked
inside its open call, so its ``/proc/TID/syscall`` names the call and its arguments:
``open``, ``openat``, ``open_by_handle_at`` (the flags argument), ``openat2`` (its
``struct open_how``, read from ``/proc/TID/mem``), ``creat`` (a write), ``execve`` and
``execveat`` (reads). An open whose flags cannot be learned (a 32-bit task, an
io_uring worker, a kernel thread, an architecture without a table here) counts as a
write.

From :meth:`OpenHold.engage` (the tasks are frozen) until :meth:`OpenHold.release`
(they are thawed), an open of a needed file for writing (``O_WRONLY``, ``O_RDWR``, or
``O_TRUNC``) by a process other than this one and its descendants (the payload:
``criu dump`` is part of the checkpoint) is held (``delay``: answered ``FAN_ALLOW`` at the
release) or refused (``deny``: ``FAN_DENY``, the opener's ``open`` fails with
``EPERM``); every other open is allowed at once, and before ``engage`` every open is.

Safety, since a held open is a blocked process:

* the answers come from a process forked for them, which runs nothing but its
  loop (no lock, no log, no import): nothing of the controller's can stall it, not
  Python's lock, not a SIGSTOP; it also keeps the change watch's groups open (see
  :class:`OpenHold`);
* holding ends ``limit_s`` after :meth:`OpenHold.engage` (the mount's
  ``freeze_timeout``) whatever else happens: every held open is let go and nothing
  more is held (a write then lands under the frozen tasks, and the change watch
  fails the checkpoint: ``delay`` is never weaker than ``fail``); the guard is told
  the same end, for an answering process that cannot keep it;
* an error in the answering loop allows that open and turns the hold off: every
  held open allowed, the marks removed, whatever is still queued allowed;
* a controller that dies closes its end of the answering process's socket: that
  process lets every held open go and exits; the guard holds copies of the
  descriptors (:attr:`OpenHold.descriptor`, a ``fanotify`` rescue) and, when the
  controller dies or the hold's end passes, removes the marks, allows what is
  queued and what the answering process read (by its descriptor numbers), and
  closes its copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import os
import platform
import select
import signal
import socket
import struct
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

from snapcore.host import fanotify
from snapcore.tasks.resolve import parent_of


class HoldMode(StrEnum):
    """What happens to a write open of a needed file while the tasks are frozen."""

    #: Held until the tasks are thawed, then allowed.
    DELAY = "delay"
    #: Refused: the opener gets ``EPERM``.
    DENY = "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class HoldFile:
    """A needed file whose write opens are held or refused."""

    path: str
    dev: int
    ino: int
    #: A path reaching the inode (``/proc/PID/fd/N``...): the mark goes on what it reaches.
    via: str
    mode: HoldMode


@dataclass(slots=True, kw_only=True)
class HeldOpen:
    """One open held back or refused."""

    path: str
    dev: int
    ino: int
    #: The opener's process (None when it could not be read) and thread.
    pid: int | None
    tid: int
    command: str
    #: The open flags as the call had them, or why they are unknown.
    flags: str
    #: ``delayed`` or ``denied``.
    action: str
    #: ``time.monotonic()`` when it was asked.
    at: float
    held_ms: float = 0.0
    #: Why a delayed open was let go: ``thaw``, ``deadline`` (the hold's end,
    #: ``limit_s`` after the freeze), ``error`` (the hold turned itself off),
    #: ``controller gone`` (it died).
    released: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "device": f"{os.major(self.dev)}:{os.minor(self.dev)}",
            "inode": self.ino,
            "pid": self.pid,
            "tid": self.tid,
            "command": self.command,
            "flags": self.flags,
            "action": self.action,
            "held_ms": round(self.held_ms, 3),
            **({"released": self.released} if self.released else {}),
        }


# -- what the opener asked for ------------------------------------------------------------

#: syscall number -> index of its flags argument (x86_64, aarch64 generic table).
_FLAGS_ARG = {
    "x86_64": {2: 1, 257: 2, 304: 2},  # open, openat, open_by_handle_at
    "aarch64": {56: 2, 265: 2},  # openat, open_by_handle_at
}
_OPENAT2 = {"x86_64": 437, "aarch64": 437}
_CREAT = {"x86_64": 85}
_EXEC = {"x86_64": (59, 322), "aarch64": (221, 281)}
_NAMES = {2: "open", 257: "openat", 304: "open_by_handle_at", 56: "openat", 265: "open_by_handle_at", 437: "openat2"}
_ARCH = platform.machine()
_O_ACCMODE = 0o3
_FLAG_NAMES = (
    (os.O_APPEND, "O_APPEND"),
    (os.O_CREAT, "O_CREAT"),
    (os.O_TRUNC, "O_TRUNC"),
    (os.O_EXCL, "O_EXCL"),
    (os.O_SYNC, "O_SYNC"),
    (os.O_DIRECT, "O_DIRECT"),
)


def describe_flags(flags: int) -> str:
    """``O_WRONLY|O_APPEND``: the access mode and the flags that matter for a write."""
    mode = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}.get(flags & _O_ACCMODE, f"accmode {flags & _O_ACCMODE}")
    return "|".join([mode, *(name for bit, name in _FLAG_NAMES if flags & bit)])


def writes(flags: int) -> bool:
    """Does an open with these flags let the opener change the file?"""
    return (flags & _O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def _read_small(path: str, size: int = 512) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def opener_flags(tid: int, arch: str = _ARCH) -> tuple[int | None, str]:
    """The flags of the open call thread ``tid`` is blocked in, and how they were
    learned; ``(None, why)`` when they cannot be."""
    try:
        fields = _read_small(f"/proc/{tid}/syscall").split()
    except OSError as exc:
        return None, f"unknown: /proc/{tid}/syscall: {exc.strerror}"
    try:
        nr = int(fields[0])
        args = [int(a, 16) for a in fields[1:7]]
    except (IndexError, ValueError):
        return None, f"unknown: not in a system call ({fields[0].decode(errors='replace') if fields else 'empty'})"
    index = _FLAGS_ARG.get(arch, {}).get(nr)
    if index is not None:
        return args[index] & 0xFFFFFFFF, _NAMES.get(nr, str(nr))
    if nr == _CREAT.get(arch):
        return os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "creat"
    if nr in _EXEC.get(arch, ()):
        return os.O_RDONLY, "execve"
    if nr == _OPENAT2.get(arch):
        try:  # struct open_how { u64 flags; u64 mode; u64 resolve; }
            fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                (flags,) = struct.unpack("=Q", os.pread(fd, 8, args[2]))
            finally:
                os.close(fd)
        except (OSError, struct.error) as exc:
            return None, f"unknown: openat2's open_how unreadable ({exc})"
        return flags & 0xFFFFFFFF, "openat2"
    return None, f"unknown: system call {nr} on {arch}"


def _status(tid: int) -> tuple[int | None, str]:
    """The thread's process id and command name."""
    pid: int | None = None
    command = "?"
    with contextlib.suppress(OSError, ValueError):
        for line in _read_small(f"/proc/{tid}/status", 1024).splitlines():
            if line.startswith(b"Name:"):
                command = line.split(b":", 1)[1].strip().decode(errors="replace")
            elif line.startswith(b"Tgid:"):
                pid = int(line.split()[1])
                break
    return pid, command


def _descends_from(pid: int, ancestor: int) -> bool:
    """Is process ``pid`` ``ancestor`` or one of its descendants?"""
    for _ in range(256):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        pid = parent_of(pid)  # 0 once gone
    return False


#: How long :meth:`OpenHold.release` waits for the answering process's report.
RELEASE_WAIT_S = 10.0
#: Held or refused opens listed in the report (the rest are counted).
MAX_REPORTED = 200  # one SOCK_SEQPACKET message: well under the socket's buffer


# -- the hold -------------------------------------------------------------------------------


class OpenHold:
    """Hold back or refuse write opens of needed files. ``start`` (marks, the
    answering process), ``engage`` (the tasks are frozen), ``release`` (thawed:
    returns what was held).

    The answers come from a process forked for it (:meth:`start`): nothing of the
    controller's can stall it, not even Python's lock (btrfsutil's snapshot keeps
    that for the whole ioctl, 68 ms measured), nor the controller stopping (SIGSTOP)
    or dying. It holds copies of ``keep`` too (the change watch's groups): a group
    that a held opener has pinned cannot finish closing until the opener is
    answered, so the controller's exit must never be the one to close it.

    Args:
        files: the needed files and what to do with their write opens.
        limit_s: the longest holding lasts (from :meth:`engage`).
        keep: other descriptors the answering process keeps open while it runs.
    """

    def __init__(self, files: Iterable[HoldFile], *, limit_s: float, keep: Iterable[int] = ()) -> None:
        self.files = {(f.dev, f.ino): f for f in files}
        self.limit_s = limit_s
        self.keep = tuple(keep)
        self.warnings: list[str] = []
        #: Every open held or refused, oldest first (known after :meth:`release`).
        self.held: list[HeldOpen] = []
        self.marks = 0
        #: Permission events answered (every open of a marked file; after :meth:`release`).
        self.asked = 0
        self._fd: int | None = None
        self._engaged = False
        self._stopping = False
        #: When holding ends at the latest (``time.monotonic()``), once engaged.
        self.until: float | None = None
        #: Why the hold turned itself off, if it did.
        self.failure: str | None = None
        self._waiting: list[tuple[int, HeldOpen]] = []
        self._ctl: socket.socket | None = None
        self._why_stopped = "thaw"
        self._child: int | None = None
        self._pid = os.getpid()

    @property
    def descriptor(self) -> int | None:
        """The group's descriptor (for the guard's copy), None when not running."""
        return self._fd

    @property
    def answerer(self) -> int | None:
        """The answering process's pid (it holds the events it read), once started."""
        return self._child

    def start(self) -> None:
        """Create the group, mark every file, start the answering process
        (everything allowed until :meth:`engage`). Where fanotify cannot hold opens
        the reason goes to :attr:`warnings` and nothing runs: the watch still judges."""
        if self._fd is not None or not self.files:
            return
        try:
            self._fd = fanotify.init(
                fanotify.FAN_CLASS_CONTENT
                | fanotify.FAN_NONBLOCK
                | fanotify.FAN_REPORT_TID
                | fanotify.FAN_UNLIMITED_QUEUE
                | fanotify.FAN_UNLIMITED_MARKS
            )
        except OSError as exc:
            self.warnings.append(f"fanotify permission events unavailable ({exc.strerror}): write opens not held")
            return
        for f in self.files.values():
            try:
                fanotify.mark(self._fd, fanotify.FAN_MARK_ADD, fanotify.FAN_OPEN_PERM, f.via)
                self.marks += 1
            except OSError as exc:
                self.warnings.append(f"cannot hold write opens of {f.path}: {exc.strerror}")
        if not self.marks:
            os.close(self._fd)
            self._fd = None
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                with warnings.catch_warnings():
                    # newer Pythons warn on fork with threads: the child runs only its own loop
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            except OSError:
                ours.close()
                theirs.close()
                raise
        except OSError as exc:  # no process to answer: nothing may be marked
            self.warnings.append(f"cannot start the open hold's answering process ({exc.strerror}): writes not held")
            os.close(self._fd)
            self._fd = None
            return
        if pid == 0:
            self._answerer(theirs.detach())
        theirs.close()
        self._ctl, self._child = ours, pid

    def engage(self, until: float | None = None) -> None:
        """From now on write opens of the needed files are held or refused, until
        :meth:`release` or ``until`` (a ``time.monotonic()`` value; default: now +
        ``limit_s``), when every held open is let go and nothing more is held."""
        self.until = until if until is not None else time.monotonic() + self.limit_s
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                self._ctl.send(b"E" + repr(self.until).encode())

    def release(self) -> list[HeldOpen]:
        """Let every held open go, stop answering, close the group (idempotent).
        Returns :attr:`held`."""
        fd, self._fd = self._fd, None
        if fd is None:
            return self.held
        with contextlib.suppress(OSError):
            fanotify.flush(fd)  # nothing new is asked from here on
        ctl, self._ctl = self._ctl, None
        reply = b""
        if ctl is not None:
            with contextlib.suppress(OSError):
                ctl.send(b"R")
                ctl.settimeout(RELEASE_WAIT_S)
                reply = ctl.recv(1 << 22)
            ctl.close()
        if reply:
            self._take(reply)
        else:  # it died (or hangs): whatever is still queued, we allow
            self.warnings.append("the open hold's answering process did not report: queued opens allowed here")
            with contextlib.suppress(OSError):
                for _mask, event_fd, _tid in fanotify.read_events(fd):
                    self._answer(fd, event_fd, True)
        if self._child is not None:
            if not reply:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._child, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._child, 0)
            self._child = None
        # closing a fanotify descriptor waits for the kernel's SRCU grace period: aside
        threading.Thread(target=_close_quietly, args=(fd,), name="snapcore-open-hold-close", daemon=True).start()
        return self.held

    def _take(self, reply: bytes) -> None:
        """The answering process's report."""
        try:
            report = json.loads(reply)
            self.held = [HeldOpen(**h) for h in report["held"]]
            self.asked = int(report["asked"])
            self.failure = report["failure"]
            if report["dropped"]:
                self.warnings.append(f"{report['dropped']} more held or refused opens not listed")
        except (ValueError, KeyError, TypeError) as exc:
            self.warnings.append(f"the open hold's report was unreadable: {exc}")

    # -- the answering process ------------------------------------------------------------

    def _answerer(self, ctl: int) -> NoReturn:
        """The forked child: answer until told to stop (or the controller is gone),
        report, exit. Never returns."""
        code = 1
        try:
            gc.disable()  # a cycle of the parent's collected here could close a reused fd
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C at the terminal: the controller decides
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the controller's handler
            fd = self._fd
            assert fd is not None
            keep = {fd, ctl, *self.keep}
            null = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(null, std)
            for name in os.listdir("/proc/self/fd"):
                if int(name) > 2 and int(name) not in keep:
                    with contextlib.suppress(OSError):
                        os.close(int(name))
            report = self._run(fd, ctl)
            with contextlib.suppress(OSError):
                os.write(ctl, report)
            code = 0
        finally:
            os._exit(code)

    def _run(self, fd: int, ctl: int) -> bytes:
        try:
            self._serve(fd, ctl)
        except BaseException as exc:
            self.failure = self.failure or f"{type(exc).__name__}: {exc}"
        finally:
            # whatever happened: nothing stays held, nothing stays unanswered
            self._let_all_go(fd, "error" if self.failure else self._why_stopped)
            with contextlib.suppress(OSError):
                for _mask, event_fd, _tid in fanotify.read_events(fd):
                    self._answer(fd, event_fd, True)
        held = [dataclasses.asdict(h) for h in self.held[:MAX_REPORTED]]
        report = {"held": held, "asked": self.asked, "failure": self.failure, "dropped": len(self.held) - len(held)}
        return json.dumps(report).encode()

    def _serve(self, fd: int, ctl: int) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(ctl, select.POLLIN)
        while not self._stopping:
            timeout = None
            if self._engaged and self.until is not None:
                timeout = max(0, int((self.until - time.monotonic()) * 1000) + 1)
            try:
                ready = poller.poll(timeout)
            except InterruptedError:
                continue
            if any(r == ctl for r, _ in ready):
                self._order(os.read(ctl, 256))
                if self._stopping:
                    return
            if self._engaged and self.until is not None and time.monotonic() >= self.until:
                self._engaged = False  # the hold's end: nothing more is held
                self._let_all_go(fd, "deadline")
            for _mask, event_fd, tid in fanotify.read_events(fd):
                if event_fd < 0:
                    continue
                self.asked += 1
                try:
                    self._decide(fd, event_fd, tid)
                except Exception as exc:
                    self._answer(fd, event_fd, True)
                    self._turn_off(fd, f"{type(exc).__name__}: {exc}")

    def _order(self, message: bytes) -> None:
        """``E<until>``: engage; ``R``: release; nothing: the controller is gone."""
        if message.startswith(b"E"):
            self.until = float(message[1:])
            self._engaged = True
        else:
            self._stopping = True
            self._why_stopped = "thaw" if message else "controller gone"

    def _turn_off(self, fd: int, why: str) -> None:
        """An internal error: allow everything from now on."""
        if self.failure is None:
            self.failure = why
            self._engaged = False
            with contextlib.suppress(OSError):
                fanotify.flush(fd)
            self._let_all_go(fd, "error")

    def _decide(self, fd: int, event_fd: int, tid: int) -> None:
        if not self._engaged or (self.until is not None and time.monotonic() >= self.until):
            self._answer(fd, event_fd, True)
            return
        st = os.fstat(event_fd)
        f = self.files.get((st.st_dev, st.st_ino))
        flags, how = opener_flags(tid)
        if f is None or (flags is not None and not writes(flags)):
            self._answer(fd, event_fd, True)
            return
        pid, command = _status(tid)
        if pid is not None and _descends_from(pid, self._pid):
            # ours, or the payload's (``criu dump``): holding it would stall the
            # checkpoint it is part of; what it writes, the watch judges
            self._answer(fd, event_fd, True)
            return
        record = HeldOpen(
            path=f.path,
            dev=f.dev,
            ino=f.ino,
            pid=pid,
            tid=tid,
            command=command,
            flags=f"{describe_flags(flags)} ({how})" if flags is not None else how,
            action="denied" if f.mode is HoldMode.DENY else "delayed",
            at=time.monotonic(),
        )
        self.held.append(record)
        if f.mode is HoldMode.DENY:
            self._answer(fd, event_fd, False)
        else:
            self._waiting.append((event_fd, record))

    def _answer(self, fd: int, event_fd: int, allow: bool) -> None:
        try:
            fanotify.respond(fd, event_fd, allow)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the opener was killed meanwhile
                raise
        finally:
            with contextlib.suppress(OSError):
                os.close(event_fd)

    def _let_go(self, fd: int, event_fd: int, record: HeldOpen, why: str) -> None:
        record.held_ms = (time.monotonic() - record.at) * 1000
        record.released = why
        with contextlib.suppress(OSError):
            self._answer(fd, event_fd, True)

    def _let_all_go(self, fd: int, why: str) -> None:
        waiting, self._waiting = self._waiting, []
        for event_fd, record in waiting:
            self._let_go(fd, event_fd, record, why)


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
