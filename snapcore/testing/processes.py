"""Processes that hold files open, as a checkpointed program does (tests of the
inventory, the change watch and ``checkpoint --pid``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from snapcore.testing import machine_pace

# Opens files as told ("r:PATH" reads 3 bytes, "w:PATH", "a:PATH", "m:PATH" maps and
# closes the fd, "cwd:PATH"), touches READY, then sleeps.
HOLDER = r"""
import ctypes, mmap, os, resource, sys, time
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
keep = []
specs = sys.argv[2:]
if specs and specs[0].startswith("@"):
    specs = open(specs[0][1:]).read().split("\n")
for spec in specs:
    if not spec:
        continue
    mode, path = spec.split(":", 1)
    if mode == "cwd":
        os.chdir(path)
        continue
    if mode == "m":  # libc mmap: Python's mmap module would keep a dup of the fd
        fd = os.open(path, os.O_RDONLY)
        libc.mmap(None, os.fstat(fd).st_size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
        os.close(fd)
        continue
    flags = {"r": os.O_RDONLY, "w": os.O_RDWR, "a": os.O_WRONLY | os.O_APPEND}[mode]
    fd = os.open(path, flags)
    if mode == "r":
        os.read(fd, 3)
    keep.append(fd)
# the ready file appears whole (a rename), never while we hold it open: a test that
# saw it half-made would inventory it as one of the files this holder needs
open(sys.argv[1] + ".tmp", "w").close()
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"""


class Holders:
    """Starts holder processes and kills them all at teardown."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, *specs: str, timeout: float = 30.0, wrap: Sequence[str] = ()) -> int:
        """Start a holder; ``wrap`` is a command that execs the rest of its argv (e.g.
        ``unshare -m sh -c 'mount ...; exec "$@"' sh``: a holder in a mount namespace
        of its own, as in a container). Returns its pid once it holds everything."""
        ready = self.base / f"ready-{len(self.procs)}"
        args = list(specs)
        if len(args) > 100:
            listing = self.base / f"specs-{len(self.procs)}"
            listing.write_text("\n".join(args))
            args = [f"@{listing}"]
        proc = subprocess.Popen(
            [*wrap, sys.executable, "-c", HOLDER, str(ready), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + machine_pace().seconds(timeout)
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"holder failed: {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("holder did not start")
            time.sleep(0.005)
        return proc.pid

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(machine_pace().seconds(10))
            if proc.stderr:
                proc.stderr.close()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Holders]:
    """``holder("r:PATH", "w:PATH", "m:PATH", "cwd:PATH", ...)`` starts a process that
    opens (or maps, or works in) each, and returns its pid; all are killed at teardown."""
    holders = Holders(tmp_path)
    try:
        yield holders
    finally:
        holders.close()


# Opens PATH as HOW says (after it stopped being a descendant of ANCESTOR: started by
# `setsid -f`, it is re-parented away from the test, as any other program on the
# machine is), writes a line if it may, and leaves OUT (JSON: result, ms) whole.
STRANGER = r"""
import ctypes, errno, json, os, struct, sys, time
path, how, out, ancestor = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def descends():
    pid = os.getpid()
    while pid > 1:
        if pid == ancestor:
            return True
        stat = open(f"/proc/{pid}/stat", "rb").read()
        pid = int(stat[stat.rindex(b")") + 2:].split()[1])
    return False
give_up = time.monotonic() + 30
while descends() and time.monotonic() < give_up:
    time.sleep(0.001)
open(out + ".pid", "w").write(str(os.getpid()))
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
FLAGS = {"read": os.O_RDONLY, "append": os.O_WRONLY | os.O_APPEND, "rdwr": os.O_RDWR,
         "trunc-ro": os.O_RDONLY | os.O_TRUNC}
def raw(*args):
    fd = libc.syscall(*args)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)
t = time.monotonic()
try:
    if how == "creat":  # x86_64 creat(2)
        fd = raw(85, path.encode(), 0o644)
    elif how.startswith("openat2-"):
        flags = os.O_WRONLY | os.O_APPEND if how == "openat2-write" else os.O_RDONLY
        open_how = ctypes.create_string_buffer(struct.pack("=QQQ", flags, 0, 0))
        fd = raw(437, -100, path.encode(), open_how, 24)
    else:
        fd = os.open(path, FLAGS[how])
    if how in ("append", "rdwr", "creat", "openat2-write"):
        os.write(fd, b"stranger\n")
    os.close(fd)
    result = "ok"
except OSError as exc:
    result = errno.errorcode.get(exc.errno, str(exc.errno))
with open(out + ".tmp", "w") as f:
    json.dump({"result": result, "ms": (time.monotonic() - t) * 1000}, f)
os.rename(out + ".tmp", out)
"""


class Stranger:
    """An opener that is no descendant of the test (so no descendant of a
    controller running in it): see :func:`start_stranger`."""

    def __init__(self, out: Path) -> None:
        self.out = out

    @property
    def pid(self) -> int | None:
        try:
            return int(self.out.with_name(self.out.name + ".pid").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def blocked(self) -> bool:
        """Waiting for a fanotify answer (in the kernel's fanotify code)."""
        try:
            return Path(f"/proc/{self.pid}/wchan").read_text().startswith("fanotify")
        except (OSError, TypeError):
            return False

    def wait_blocked(self, timeout: float) -> None:
        deadline = time.monotonic() + machine_pace().seconds(timeout)
        while not self.blocked():
            if self.out.exists():
                raise AssertionError(f"the opener was not held: {self.out.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("the opener never waited for a fanotify answer")
            time.sleep(0.005)

    def result(self, timeout: float) -> dict[str, object]:
        """What its open did (``result``: ok or an errno name; ``ms``)."""
        import json

        deadline = time.monotonic() + machine_pace().seconds(timeout)
        while not self.out.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"the opener did not finish within {timeout:g}s (blocked: {self.blocked()})")
            time.sleep(0.005)
        result: dict[str, object] = json.loads(self.out.read_text())
        return result

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_stranger(path: Path | str, how: str, out: Path, wrap: Sequence[str] = ()) -> Stranger:
    """Open ``path`` from a process that is no descendant of this one. ``how``:
    ``read``, ``append``, ``rdwr``, ``trunc-ro`` (``O_RDONLY|O_TRUNC``), ``creat``
    (the system call), ``openat2-write``, ``openat2-read``. ``wrap`` execs the rest
    (``unshare -m ...``). Its pid is known once it is no descendant
    (:attr:`Stranger.pid`)."""
    subprocess.run(
        ["setsid", "-f", *wrap, sys.executable, "-c", STRANGER, str(path), how, str(out), str(os.getpid())],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Stranger(out)
