"""Fixtures for the dm tests that run *inside* the test VM (see ``test_dm_vm.py``).

On the host these files are not even collected: the host's kernel has no
device-mapper, and the host-side test boots the VM and runs them there. Scratch
images live in the guest's ``/run`` (a tmpfs inside the VM).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

IN_VM = os.environ.get("SNAPCORE_IN_VM") == "1" and os.path.exists("/dev/mapper/control")

if not IN_VM:
    collect_ignore_glob = ["test_*.py"]

from dmguest import POOL, SCRATCH, VG, VolumeFactory, drop_loop, make_loop, sh  # noqa: E402


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


@pytest.fixture
def volume(vg: str) -> Iterator[VolumeFactory]:
    factory = VolumeFactory(vg)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def policy_file(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str) -> Path:
        path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        return path

    return write
