"""Seeing whether a filesystem is frozen without ever blocking the test: a write in a
child process (:class:`WriteProbe`), judged with a timeout; and thawing what a
failed test left frozen."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from snapcore.safety.guard import FITHAW
from snapcore.testing.pace import machine_pace


def thaw_quietly(path: str | os.PathLike[str]) -> bool:
    """FITHAW ``path`` if it is frozen; True when it was. Never raises."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        return exc.errno != errno.EINVAL and False
    finally:
        os.close(fd)


class WriteProbe:
    """A write to ``path`` in a child process; blocks there while the fs is frozen."""

    def __init__(self, path: str | os.PathLike[str], data: bytes = b"probe\n") -> None:
        self.path = os.fspath(path)
        # coreutils dd, not a Python child: an exec costs ~1 ms where an interpreter
        # start costs 6-20 ms on a host and ~0.5 s in the emulated test VM
        self.proc = subprocess.Popen(
            ["dd", f"of={self.path}", "oflag=append", "conv=notrunc,fsync", "status=none"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdin is not None
        with self.proc.stdin:  # a pipe's buffer takes it even while dd waits on the freeze
            self.proc.stdin.write(data)
        self.proc.stdin = None
        _PROBES.append(self)

    def done(self, timeout: float) -> bool:
        """True when the write finished within ``timeout`` seconds."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        if self in _PROBES:
            _PROBES.remove(self)
        if self.proc.returncode != 0:
            raise RuntimeError(f"write probe failed: {err.decode(errors='replace')}")
        return True


_PROBES: list[WriteProbe] = []


def reap_probes(timeout: float = 20.0) -> list[str]:
    """Wait for write probes a test left behind (after thawing), so none lingers."""
    problems = []
    for probe in list(_PROBES):
        try:
            probe.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            probe.proc.kill()
            probe.proc.communicate()
            problems.append(f"write probe {probe.path} never finished: a filesystem stayed frozen")
        _PROBES.remove(probe)
    return problems


def start_write(path: str | os.PathLike[str], data: bytes = b"probe\n") -> WriteProbe:
    return WriteProbe(path, data)


def wait_for_path(path: Path, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    """Wait until ``path`` exists (a child's "I am ready" or "I got here"); fail the
    test, naming ``what``, if ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited ({proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {path.name} did not appear within {timeout:.0f}s")
        time.sleep(0.01)


def assert_not_frozen(path: str | os.PathLike[str], timeout: float = 5.0) -> None:
    """Fail (after thawing, so the machine survives) when ``path`` is frozen.

    ``timeout`` is for the reference machine; it is scaled by :func:`machine_pace`
    (on a slower machine the probe starts, writes and syncs more slowly)."""
    probe = start_write(Path(path) / f".snapcore-probe-{uuid.uuid4().hex[:6]}")
    if not probe.done(machine_pace().seconds(timeout)):
        thaw_quietly(path)
        probe.done(30)
        pytest.fail(f"{path} was left frozen")
