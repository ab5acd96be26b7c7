"""Fixtures for the dm tests that run *inside* the test VM (see ``test_dm_vm.py``).

On the host these files are not even collected: the host's kernel has no
device-mapper, and the host-side test boots the VM and runs them there. Scratch
images live in the guest's ``/run`` (a tmpfs inside the VM).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

IN_VM = os.environ.get("SNAPCORE_IN_VM") == "1" and os.path.exists("/dev/mapper/control")

if not IN_VM:
    collect_ignore_glob = ["test_*.py"]

from dmguest import POOL, SCRATCH, VG, VolumeFactory, drop_loop, make_loop, sh  # noqa: E402

from snapcore.testing.vmreport import announce  # noqa: E402


@pytest.fixture(scope="session")
def vg() -> Iterator[str]:
    """A volume group on a sparse loop device in /run, with a thin pool in it."""
    loop = make_loop("pv", 1400)
    try:
        sh("lvm", "pvcreate", "-q", "-y", loop.device)
        sh("lvm", "vgcreate", "-q", VG, loop.device)
        sh("lvm", "lvcreate", "-q", "--type", "thin-pool", "-L", "400M", "-n", POOL, VG)
        yield VG
    finally:
        subprocess.run(["umount", "-R", "-q", str(SCRATCH / "mnt")], capture_output=True, check=False)
        subprocess.run(["lvm", "vgremove", "-q", "-f", VG], capture_output=True, check=False)
        subprocess.run(["lvm", "pvremove", "-q", "-f", loop.device], capture_output=True, check=False)
        drop_loop(loop)


@pytest.fixture(scope="session", autouse=True)
def lvcreate_s(vg: str) -> float:
    """This guest's time for one ``lvcreate -s`` (the slowest of two, of a mounted
    thick ext4 LV): the reference every time allowance here is derived from, and
    sent to the host (``announce``), which scales each test's allowance by it."""
    factory = VolumeFactory(vg)
    try:
        origin = factory("thick", "ext4", size_mb=64)
        times = []
        for i in range(2):
            t = time.monotonic()
            sh("lvm", "lvcreate", "-q", "-s", "-L", "8M", "-n", f"pace{i}", origin.ref)
            times.append(time.monotonic() - t)
            sh("lvm", "lvremove", "-q", "-y", f"{VG}/pace{i}")
    finally:
        factory.close()
    seconds = max(times)
    announce(lvcreate_s=seconds)
    print(f"\nguest: one lvcreate -s takes {seconds:.2f}s here")
    return seconds


@pytest.fixture
def volume(vg: str) -> Iterator[VolumeFactory]:
    factory = VolumeFactory(vg)
    try:
        yield factory
    finally:
        factory.close()
