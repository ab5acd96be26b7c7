"""The out-of-process guard: thaws what a checkpoint froze if its controller dies.

One guard serves every checkpoint of a controller process: it is started with the
first one (:class:`snapcore.safety.deadline.GuardLink`) and lives as long as its end of a
``SOCK_SEQPACKET`` socket pair stays open, so later checkpoints of the same process
pay nothing to start it. Standard library only: it must start fast and never import
anything while filesystems are frozen.

Protocol (one JSON object per packet; ``cp`` names the checkpoint, several may be
in progress at once):

* ``{"op": "targets", "cp", "record", "targets": [{"key", "kind": "fithaw"} |
  {"key", "kind": "command", "argv"} | {"key", "kind": "write", "path", "value"} |
  {"key", "kind": "fanotify", "fds"}]}`` with descriptors attached (``SCM_RIGHTS``)
  in order: one for each ``fithaw`` target (an open directory of the mount), ``fds``
  for each ``fanotify`` one (``on_change: delay``: a copy of the permission group,
  then of the change watch's groups). ``write`` thaws a cgroup of frozen tasks;
  ``fanotify`` lets go the opens the group holds, then closes the other groups.
  Holding those too keeps a killed controller's exit from releasing them: a group
  whose marks a held opener pinned waits for that opener, and the controller's
  exit, stuck there, would never close the socket that tells us it died;
  The descriptors travel with the message: once the controller's ``send`` returns,
  the guard holds them even if the controller dies before the guard reads them.
  With ``"ack": true`` the guard answers ``ok`` once it has taken them: the
  controller waits for that before its first freeze (the guard holds them, and
  is idle again, before anything is frozen);
* a target with ``"until": at`` counts as frozen from its arrival, and is thawed
  alone once ``at`` passes, armed or not (an open hold: it holds from the moment
  the guard has its copy of the group, and ends at ``at``);
* ``{"op": "freezing", "cp", "keys"[, "at"]}`` before freezing them (with the
  deadline, as for ``arm``, on the first one after arming); ``{"op": "thawed",
  "cp", "keys"}`` after thawing them; only targets between the two are ever thawed
  by the guard (a thaw of one already thawed is harmless);
* ``{"op": "arm", "cp", "at"}`` (a ``CLOCK_MONOTONIC`` time, the same in every
  process: a guard that reads it late still thaws on time) / ``{"op": "disarm", "cp"}``;
* ``{"op": "end", "cp"}``: the checkpoint is over (anything still marked frozen is
  thawed first); ``{"op": "exit"}``.

On end of input (the controller died: a socket closes even on SIGKILL) every target
of every checkpoint still marked frozen is thawed, newest first; when a checkpoint's
deadline passes, its own are. What was done is appended to the checkpoint's RECORD
file as one JSON line, which ``snapcore recover`` reads.

A guard forked from its controller shares the controller's memory copy-on-write:
the controller forks one only while it is small (the CLI), else it starts a fresh
interpreter, so a long-lived controller is never shadowed by a growing copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import _socket
    from collections.abc import Sequence

# -- applying a rescue: the one implementation, for the guard and for recover ----------

# <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int)
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

#: How long a rescue command (``dmsetup resume``) may take before it counts as failed.
RESCUE_COMMAND_TIMEOUT_S = 30.0


def thaw_fd(fd: int) -> bool:
    """FITHAW through a descriptor of the mount; False when it was not frozen."""
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # not frozen (already thawed)
            return False
        raise
    return True


def thaw_path(path: str) -> bool:
    """FITHAW the filesystem mounted at ``path``; False when it was not frozen."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return thaw_fd(fd)
    finally:
        os.close(fd)


def write_control(path: str, value: str) -> bool:
    """Write a control file (``cgroup.freeze``, ``freezer.state``); False when it is
    gone (the cgroup was removed: nothing left to thaw)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    return True


def run_command(argv: Sequence[str]) -> None:
    """Run a rescue command (``dmsetup resume NAME``); raises when it fails or takes
    longer than :data:`RESCUE_COMMAND_TIMEOUT_S`."""
    import subprocess  # imported with the targets: never while frozen

    subprocess.run(
        [str(a) for a in argv],
        check=True,
        timeout=RESCUE_COMMAND_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


#: Descriptors per message (the kernel's SCM_MAX_FD is 253).
MAX_FDS = 200
#: Kinds of target that come with a descriptor.
WITH_FD = ("fithaw", "fanotify")

# <linux/fanotify.h>
_FAN_MARK_FLUSH = 0x80
_FAN_MARK_KINDS = (0x00, 0x10, 0x100)  # inode, mount, filesystem
_FAN_ALLOW = 0x01
_fanotify_mark = None


def _load_fanotify() -> None:
    """ctypes' fanotify_mark, loaded when a ``fanotify`` target arrives (never while frozen)."""
    global _fanotify_mark
    if _fanotify_mark is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        _fanotify_mark = libc.fanotify_mark


def release_fanotify(fd: int, owner: int | None = None) -> int:
    """Let go every open a fanotify permission group holds: its marks removed (no
    new event), every queued event allowed, then this descriptor closed (when it is
    the last, the kernel allows the events a dead reader had taken). The events a
    stalled ``owner`` process read and holds are answered too: a response names an
    event by the descriptor number its reader got, so every number in
    ``/proc/OWNER/fd`` is answered "allow" (a number that is no pending event of
    this group is refused with ENOENT, harmlessly). Returns how many answers the
    kernel took."""
    import struct

    allowed = 0
    try:
        if _fanotify_mark is not None:
            for kind in _FAN_MARK_KINDS:
                _fanotify_mark(fd, _FAN_MARK_FLUSH | kind, 0, -100, None)
        meta = struct.Struct("=IBBHQii")
        while select.select([fd], [], [], 0)[0]:
            try:
                buf = os.read(fd, 64 * meta.size)
            except BlockingIOError:
                break
            if not buf:
                break
            offset = 0
            while offset + meta.size <= len(buf):
                event_len, _, _, _, _, event_fd, _ = meta.unpack_from(buf, offset)
                offset += event_len or meta.size
                if event_fd >= 0:
                    with contextlib.suppress(OSError):
                        os.write(fd, struct.pack("=iI", event_fd, _FAN_ALLOW))
                        allowed += 1
                    with contextlib.suppress(OSError):
                        os.close(event_fd)
        if owner is not None:
            with contextlib.suppress(OSError):
                for name in os.listdir(f"/proc/{owner}/fd"):
                    with contextlib.suppress(OSError, ValueError):
                        os.write(fd, struct.pack("=iI", int(name), _FAN_ALLOW))
                        allowed += 1
    finally:
        os.close(fd)
    return allowed


class Checkpoint:
    """What the guard holds for one checkpoint."""

    def __init__(self, record: str | None) -> None:
        self.record = record
        self.targets: dict[str, dict[str, object]] = {}
        self.fds: dict[str, int] = {}
        #: Descriptors closed after a ``fanotify`` target's group (the watch's groups).
        self.extra: dict[str, list[int]] = {}
        self.frozen: list[str] = []
        self.deadline: float | None = None
        #: Deadlines of single keys (``until``).
        self.until: dict[str, float] = {}

    def close(self, *keys: str) -> None:
        """Close the descriptors of ``keys`` (default: all), each group first."""
        for key in keys or list(self.fds):
            for fd in [*([self.fds.pop(key)] if key in self.fds else []), *self.extra.pop(key, [])]:
                with contextlib.suppress(OSError):
                    os.close(fd)


class Guard:
    def __init__(self) -> None:
        self.cps: dict[str, Checkpoint] = {}

    def handle(self, msg: dict[str, object], fds: list[int]) -> bool:
        op = msg.get("op")
        cp_id = str(msg.get("cp", ""))
        keys = [str(k) for k in msg.get("keys") or []]  # type: ignore[attr-defined]
        if op == "exit":
            for cid in list(self.cps):
                self.end(cid, "exit while frozen")
            return False
        if op == "targets":
            cp = self.cps.setdefault(cp_id, Checkpoint(msg.get("record")))  # type: ignore[arg-type]
            kinds = {t.get("kind") for t in msg.get("targets") or []}  # type: ignore[attr-defined]
            if "command" in kinds:
                import subprocess  # noqa: F401  # now, before the freeze it may have to undo
            if "fanotify" in kinds:
                import struct  # noqa: F401

                _load_fanotify()
            fds = list(fds)
            for target in msg.get("targets") or []:  # type: ignore[attr-defined]
                tkey = str(target["key"])
                cp.targets[tkey] = target
                if target.get("kind") in WITH_FD and fds:
                    cp.close(tkey)
                    cp.fds[tkey] = fds.pop(0)
                    count = target.get("fds", 1)
                    extra = max(0, min(int(count) if isinstance(count, int) else 1, len(fds) + 1) - 1)
                    cp.extra[tkey], fds = fds[:extra], fds[extra:]
                if "until" in target:  # held from now on, until then at the latest
                    if tkey not in cp.frozen:
                        cp.frozen.append(tkey)
                    cp.until[tkey] = float(target["until"])
            for fd in fds:  # more than announced: not ours to keep
                os.close(fd)
            return True
        for fd in fds:
            os.close(fd)
        found = self.cps.get(cp_id)
        if found is None:
            return True
        cp = found
        if op == "freezing":
            cp.frozen.extend(k for k in keys if k not in cp.frozen)
            if "at" in msg:  # armed with the first freeze
                cp.deadline = float(msg["at"])  # type: ignore[arg-type]
        elif op == "thawed":
            cp.frozen = [k for k in cp.frozen if k not in keys]
            for key in keys:
                cp.until.pop(key, None)
                if cp.targets.get(key, {}).get("kind") == "fanotify":
                    cp.close(key)  # the hold ended: its groups go now, not with the checkpoint
        elif op == "arm":
            cp.deadline = float(msg["at"])  # type: ignore[arg-type]
        elif op == "disarm":
            cp.deadline = None
        elif op == "end":
            self.end(cp_id, "ended while frozen")
        return True

    def end(self, cp_id: str, reason: str) -> None:
        cp = self.cps.pop(cp_id, None)
        if cp is not None:
            self.rescue(cp, reason)
            cp.close()

    def rescue(self, cp: Checkpoint, reason: str, keys: Sequence[str] | None = None) -> None:
        """Thaw ``keys`` (default: every target still frozen), newest first."""
        thawed: list[str] = []
        errors: list[str] = []
        doing = [k for k in cp.frozen if keys is None or k in keys]
        cp.frozen = [k for k in cp.frozen if k not in doing]
        for key in reversed(doing):
            cp.until.pop(key, None)
            target = cp.targets.get(key, {})
            try:
                if target.get("kind") == "fithaw":
                    thaw_fd(cp.fds[key])
                elif target.get("kind") == "write":
                    write_control(str(target["path"]), str(target.get("value") or ""))
                elif target.get("kind") == "command":
                    run_command(target.get("argv") or [])  # type: ignore[arg-type]
                elif target.get("kind") == "fanotify" and key in cp.fds:
                    owner = str(target.get("value") or "")
                    release_fanotify(cp.fds.pop(key), int(owner) if owner.isdigit() else None)
                    cp.close(key)  # then the watch's groups, whose release waited for those opens
                thawed.append(key)
            except Exception as exc:
                errors.append(f"{key}: {exc}")
        if cp.record and (thawed or errors):
            line = json.dumps(
                {"op": "guard", "reason": reason, "thawed": thawed, "errors": errors, "time": time.time()}
            )
            try:
                fd = os.open(cp.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, (line + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass

    def timeout(self) -> float | None:
        deadlines = [cp.deadline for cp in self.cps.values() if cp.deadline is not None]
        deadlines += [at for cp in self.cps.values() for at in cp.until.values()]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def expire(self) -> None:
        now = time.monotonic()
        for cp in self.cps.values():
            if cp.deadline is not None and cp.deadline <= now:
                cp.deadline = None
                self.rescue(cp, "deadline")
            due = [key for key, at in cp.until.items() if at <= now]
            if due:
                self.rescue(cp, "deadline", due)
                for key in due:
                    cp.until.pop(key, None)

    def run(self, sock: _socket.socket) -> int:
        while True:
            ready, _, _ = select.select([sock], [], [], self.timeout())
            if not ready:
                self.expire()
                continue
            try:
                data, fds = recv(sock)
            except OSError:
                data, fds = b"", []
            if not data:
                for cid in list(self.cps):
                    self.end(cid, "controller gone")
                return 0
            try:
                msg = json.loads(data)
            except ValueError:
                for fd in fds:  # not ours to keep
                    os.close(fd)
                continue
            if not self.handle(msg, fds):
                return 0
            if msg.get("ack"):
                with contextlib.suppress(OSError):
                    sock.send(b"ok")


def main() -> int:
    """Serve the controller on the socket at fd 0."""
    # Ctrl-C at the controller's terminal must not kill the one who thaws;
    # a polite kill thaws first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guard = Guard()

    def on_term(signum: int, frame: object) -> None:
        for cp in guard.cps.values():
            guard.rescue(cp, "terminated")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    os.chdir("/")
    import _socket

    sock = _socket.socket(fileno=0)
    return guard.run(sock)


def recv(sock: _socket.socket) -> tuple[bytes, list[int]]:
    """One packet and the descriptors that came with it (socket.recv_fds, on the
    C module)."""
    import _socket
    import array

    data, ancdata, _, _ = sock.recvmsg(1 << 20, _socket.CMSG_SPACE(MAX_FDS * 4))
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def fork(ours: _socket.socket, theirs: _socket.socket) -> int:
    """Start the guard as a forked child serving ``theirs`` (the controller keeps
    ``ours``, and closes its copy of ``theirs``); returns its pid.

    Forking costs well under a millisecond where starting an interpreter costs ~14 ms;
    the caller forks only while every other thread is one of its own idle ones, so
    the child inherits no lock held by another thread. The child keeps nothing of
    the parent's but its end of the socket.
    """
    import warnings

    with warnings.catch_warnings():
        # newer Pythons warn on fork with threads: ours are idle and the child
        # touches nothing of theirs
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the guard
        code = 1
        try:
            import gc

            gc.disable()  # a cycle of the parent's collected here could close a reused fd
            os.setsid()
            os.dup2(theirs.detach(), 0)
            ours.detach()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.closerange(3, 1 << 20)
            code = main()
        finally:
            os._exit(code)
    return pid


if __name__ == "__main__":
    sys.exit(main())
