"""Helpers for the btrfs backend tests (their fixtures are in btrfs_fixtures.py).

Every filesystem comes from ``loop_fs`` (snapcore.testing), so it is torn down
however the test ends; the extra mounts made here register their unmount with it.
Test modules load it with ``pytest_plugins`` (a conftest.py would clash, for mypy,
with the other plugins' test directories: they are all top-level ``conftest``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapcore.testing import LoopFS, write_under


def unmount(path: Path) -> None:
    for attempt in range(20):
        done = subprocess.run(["umount", "-R", str(path)], capture_output=True, text=True)
        if done.returncode == 0 or "not mounted" in done.stderr or "no mount point" in done.stderr:
            return
        time.sleep(0.1 * (attempt + 1))
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def mount(args: list[str], where: Path, fs: LoopFS) -> Path:
    """Mount something for a test and register its unmount with the loop fs."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *args, str(where)], check=True, capture_output=True)
    fs.cleanups.append(lambda: unmount(where))
    return where


@dataclass(slots=True)
class Subvol:
    """A btrfs loop filesystem (``fs``, its top level) with subvolume ``name`` mounted at ``path``."""

    fs: LoopFS
    name: str
    path: Path

    def __fspath__(self) -> str:
        return str(self.path)

    def write(self, rel: str, data: bytes | str) -> Path:
        return write_under(self.path, rel, data)


SubvolFactory = Callable[..., Subvol]


#: what a subvolume's tree is compared without: snapcore's own snapshot directory
SNAPSHOTS = (".snapshots",)


def populate(root: Path, n: int = 20) -> None:
    (root / "docs").mkdir(exist_ok=True)
    for i in range(n):
        (root / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    (root / "big.bin").write_bytes(os.urandom(1 << 20))
    (root / "link").unlink(missing_ok=True)
    (root / "link").symlink_to("docs/f0.txt")
    (root / "exec.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "exec.sh", 0o755)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
