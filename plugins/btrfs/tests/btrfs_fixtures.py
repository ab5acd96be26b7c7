"""Fixtures for the btrfs backend tests: loop-backed btrfs with a subvolume mounted on its own.

Every filesystem comes from ``loop_fs`` (snapcore.testing), so it is torn down
however the test ends; the extra mounts made here register their unmount with it.
Test modules load this with ``pytest_plugins``: a conftest.py would clash, for mypy,
with the other plugins' test directories (they are all top-level ``conftest``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import btrfsutil
import pytest
from btrfs_testlib import Subvol, SubvolFactory, mount

from snapcore.testing import LoopFactory, LoopFS


@pytest.fixture
def btrfs_subvol(loop_fs: LoopFactory, tmp_path: Path) -> SubvolFactory:
    """``btrfs_subvol()`` → a new loop btrfs with ``@data`` mounted alone;
    ``btrfs_subvol(fs=sv.fs, name="@b")`` → another subvolume of the same filesystem."""

    def make(
        fs: LoopFS | None = None, name: str = "@data", mkfs_args: tuple[str, ...] = (), ro: bool = False
    ) -> Subvol:
        fs = fs or loop_fs("btrfs", mkfs_args=mkfs_args)
        btrfsutil.create_subvolume(str(fs.mount_point / name))
        where = tmp_path / f"mnt-{name.strip('@')}-{uuid.uuid4().hex[:6]}"
        opts = f"subvol={name}" + (",ro" if ro else "")
        mount(["-t", "btrfs", "-o", opts, fs.device], where, fs)
        return Subvol(fs=fs, name=name, path=where)

    return make


@pytest.fixture
def no_leftover_mounts() -> Iterator[None]:
    yield
    leftovers = [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if "snapcore-btrfs-top-" in line
    ]
    assert not leftovers, leftovers
