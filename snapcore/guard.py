"""The out-of-process guard: thaws what a checkpoint froze if its controller dies.

Run by :class:`snapcore.watchdog.ProcessWatchdog` as ``python -I -S guard.py
RECORD``, in a session of its own, before anything is frozen. Standard library
only (it must start fast and never import anything while filesystems are frozen).

Protocol (one JSON object per line on stdin; answers on stdout):

* ``{"op": "targets", "targets": [{"key", "kind": "fithaw", "path"} |
  {"key", "kind": "command", "argv"} | {"key", "kind": "write", "path", "value"}]}``
  (the last thaws a cgroup of frozen tasks) → opens a directory descriptor for each
  ``fithaw`` target now, answers ``ready``;
* ``{"op": "freezing", "keys": [...]}`` before freezing them; ``{"op": "thawed",
  "keys": [...]}`` after thawing them; only targets between the two are ever
  thawed by the guard (a thaw of one already thawed is harmless);
* ``{"op": "arm", "deadline_s"}`` / ``{"op": "disarm"}``;
* ``{"op": "exit"}``.

On end of input (the controller died: a pipe closes even on SIGKILL) or when the
deadline passes, every target still marked frozen is thawed, newest first; what was
done is appended to RECORD as one JSON line, and ``expired`` is written to stdout
for a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time

FITHAW = 0xC0045878


class Guard:
    def __init__(self, record: str | None) -> None:
        self.record = record
        self.targets: dict[str, dict[str, object]] = {}
        self.fds: dict[str, int] = {}
        self.frozen: list[str] = []
        self.deadline: float | None = None

    def say(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(1, (line + "\n").encode())

    def handle(self, msg: dict[str, object]) -> bool:
        op = msg.get("op")
        keys = [str(k) for k in msg.get("keys") or [msg.get("key", "")]]  # type: ignore[attr-defined]
        if op == "targets":
            for target in msg.get("targets") or []:  # type: ignore[attr-defined]
                tkey = str(target["key"])
                self.targets[tkey] = target
                if target.get("kind") == "fithaw":
                    self.fds[tkey] = os.open(str(target["path"]), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self.say("ready")
        elif op == "freezing":
            self.frozen.extend(k for k in keys if k not in self.frozen)
        elif op == "thawed":
            self.frozen = [k for k in self.frozen if k not in keys]
        elif op == "arm":
            self.deadline = time.monotonic() + float(msg["deadline_s"])  # type: ignore[arg-type]
        elif op == "disarm":
            self.deadline = None
        elif op == "exit":
            return False
        return True

    def rescue(self, reason: str) -> None:
        thawed: list[str] = []
        errors: list[str] = []
        for key in reversed(self.frozen):
            target = self.targets.get(key, {})
            try:
                if target.get("kind") == "fithaw":
                    try:
                        fcntl.ioctl(self.fds[key], FITHAW, 0)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:  # EINVAL: it was not frozen
                            raise
                elif target.get("kind") == "write":
                    fd = os.open(str(target["path"]), os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, str(target.get("value") or "").encode())
                    finally:
                        os.close(fd)
                elif target.get("kind") == "command":
                    argv = [str(a) for a in target.get("argv") or []]  # type: ignore[attr-defined]
                    subprocess.run(argv, check=True, timeout=30, stdin=subprocess.DEVNULL, capture_output=True)
                thawed.append(key)
            except Exception as exc:
                errors.append(f"{key}: {exc}")
        self.frozen.clear()
        if self.record and (thawed or errors):
            line = json.dumps(
                {"op": "guard", "reason": reason, "thawed": thawed, "errors": errors, "time": time.time()}
            )
            try:
                fd = os.open(self.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                try:
                    os.write(fd, (line + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass

    def run(self) -> int:
        buf = b""
        while True:
            timeout = None
            if self.deadline is not None:
                timeout = max(0.0, self.deadline - time.monotonic())
            ready, _, _ = select.select([0], [], [], timeout)
            if not ready:
                self.deadline = None
                self.rescue("deadline")
                self.say("expired")
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                self.rescue("controller gone")
                return 0
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip() and not self.handle(json.loads(line)):
                    self.rescue("exit while frozen")
                    return 0


def main(record: str | None = None) -> int:
    # Ctrl-C at the controller's terminal must not kill the one who thaws;
    # a polite kill thaws first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    guard = Guard(record)

    def on_term(signum: int, frame: object) -> None:
        guard.rescue("terminated")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    os.chdir("/")
    return guard.run()


def fork(record: str | None) -> tuple[int, int, int]:
    """Start the guard as a forked child: ``(pid, fd to write to it, fd to read from it)``.

    Forking costs about a millisecond where starting an interpreter costs ~14 ms;
    the caller forks only while it has a single thread, so the child inherits no
    lock held by another thread. The child keeps nothing of the parent's but its
    two pipes.
    """
    to_guard_r, to_guard_w = os.pipe()
    from_guard_r, from_guard_w = os.pipe()
    import warnings

    with warnings.catch_warnings():
        # newer Pythons warn on fork with threads: ours are idle and the child
        # touches nothing of theirs
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the guard
        code = 1
        try:
            os.setsid()
            os.dup2(to_guard_r, 0)
            os.dup2(from_guard_w, 1)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 2)
            os.closerange(3, 1 << 20)
            code = main(record)
        finally:
            os._exit(code)
    os.close(to_guard_r)
    os.close(from_guard_w)
    return pid, to_guard_w, from_guard_r


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
