"""The conformance kit (:mod:`snapcore.contract`) run against the dm backend, in the VM.

Each class images one LVM LV that the guest fixtures make: a thick one, a thin one,
and a thick one paired with the tar exporter. The LV (and its filesystem) is made
once per class and shared by the class's tests — an ``lvcreate`` + ``mkfs`` costs
seconds under emulation — so after every test a teardown proves the contract's
"nothing left" for dm itself: no dm device suspended, no snapshot of the LV still
mounted; it then removes the snapshots the successful checkpoints kept.

The freeze window holds a whole ``lvcreate -s``, so the deadline here is derived from
one ``lvcreate -s`` timed in this very guest (the ``lvcreate_s`` fixture), not from the
contract's 0.5 s nor from a constant: emulation runs ~3x slower on some machines.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from dmguest import VG, Volume, VolumeFactory, installed, sh

from snapcore.contract import BackendContract
from snapcore.testing import LoopFactory


def suspended_devices() -> list[str]:
    out = sh("dmsetup", "info", "-c", "--noheadings", "--separator", ":", "-o", "name,suspended")
    rows = (line.rsplit(":", 1) for line in out.splitlines() if ":" in line)
    return [name for name, state in rows if state.strip() == "Suspended"]


def snapshot_mounts(vol: Volume) -> list[str]:
    """Mount points of any snapshot of ``vol`` (its dm name prefixed by the origin's)."""
    prefix = f"{vol.device}--snapcore--"
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [fields[1] for fields in (line.split() for line in f) if fields[0].startswith(prefix)]


#: Each class costs ~4 min emulated (two Python starts and a few LVM commands per
#: fault): the thick one always runs, the thin one and the one with the tar exporter
#: on demand, with SNAPCORE_DM_CONTRACT=all (test_dm_vm.py passes it into the VM).
ON_DEMAND = os.environ.get("SNAPCORE_DM_CONTRACT") == "all"


class _DmContract(BackendContract):
    imager = "dm"
    fstype = "ext4"
    #: the LV to make: "thick" or "thin"
    kind: ClassVar[str] = "thick"
    #: the deadline: this many times one lvcreate -s measured here (the window holds
    #: one, and the guard's messages), and never less than 3 s
    LVCREATES_PER_WINDOW: ClassVar[float] = 4.0
    volume: Volume

    @pytest.fixture
    def contract_deadline(self, lvcreate_s: float) -> float:
        return max(3.0, self.LVCREATES_PER_WINDOW * lvcreate_s)

    @pytest.fixture(scope="class")
    @classmethod
    def dm_volume(cls, vg: str) -> Iterator[Volume]:
        if cls.exporter and not installed(cls.exporter):
            pytest.skip(f"the {cls.exporter} exporter (plugins/{cls.exporter}) is not installed")
        factory = VolumeFactory(vg)
        try:
            yield factory(cls.kind, cls.fstype, size_mb=64)
        finally:
            factory.close()

    @pytest.fixture(autouse=True)
    def _dm_left_clean(self, dm_volume: Volume) -> Iterator[None]:
        self.volume = dm_volume
        yield
        problems = []
        stuck = suspended_devices()
        for name in stuck:  # resume first, so that the rest of the session survives
            subprocess.run(["dmsetup", "resume", name], capture_output=True, check=False)
        if stuck:
            problems.append(f"dm devices left suspended: {stuck}")
        mounted = snapshot_mounts(dm_volume)
        for where in mounted:
            subprocess.run(["umount", "-l", where], capture_output=True, check=False)
        if mounted:
            problems.append(f"snapshots left mounted at {mounted}")
        out = sh("lvm", "lvs", "--noheadings", "-o", "lv_name", "-S", f"origin={dm_volume.lv}", VG)
        for snap in out.split():
            sh("lvm", "lvremove", "-q", "-y", f"{VG}/{snap}")
        assert not problems, "; ".join(problems)

    def make_mount(self, loop_fs: LoopFactory) -> Path:
        self.volume.write("data/file.txt", "contract\n")
        return self.volume.mount_point

    def backend_options(self, tmp_path: Path) -> dict[str, dict[str, Any]]:
        return {"dm": {"size": "8M"}} if self.kind == "thick" else {}


class TestDmThickContract(_DmContract):
    kind = "thick"


class TestDmThinContract(_DmContract):
    __test__ = ON_DEMAND
    kind = "thin"


class TestDmTarContract(_DmContract):
    __test__ = ON_DEMAND
    kind = "thick"
    exporter = "tar"

    def backend_options(self, tmp_path: Path) -> dict[str, dict[str, Any]]:
        dest = tmp_path / "exports"  # on the guest's /tmp, not on the LV
        dest.mkdir()
        return {**super().backend_options(tmp_path), "tar": {"dest": str(dest)}}
