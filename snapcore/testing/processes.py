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
