"""Helpers for the dm tests that run inside the test VM (imported by conftest and tests)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from snapcore.testing import write_under

SCRATCH = Path("/run/snapcore-tests")
VG = "scvg"
POOL = "pool"


def sh(*argv: str, input: str | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass(slots=True)
class Loop:
    image: Path
    device: str


def make_loop(name: str, size_mb: int) -> Loop:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    image = SCRATCH / f"{name}.img"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    device = sh("losetup", "--find", "--show", str(image)).strip()
    return Loop(image=image, device=device)


def drop_loop(loop: Loop) -> None:
    subprocess.run(["losetup", "-d", loop.device], capture_output=True, check=False)
    loop.image.unlink(missing_ok=True)


# ext4 zeroes its inode tables and journal lazily, from a kernel thread, after the
# first mount: on a 64 MiB volume that is ~4 MiB written at a moment nobody chose,
# enough to overflow a test's small COW (it did, in CI, on a slower run). Zeroed
# by mkfs instead, the only writes under a snapshot are the test's own.
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
}


@dataclass(slots=True)
class Volume:
    """A mounted filesystem on an LV (or a raw dm device) that a test made."""

    kind: str
    fstype: str
    lv: str
    device: str
    mount_point: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(self.mount_point)

    @property
    def ref(self) -> str:
        return f"{VG}/{self.lv}"

    def write(self, rel: str, data: bytes | str) -> Path:
        return write_under(self.mount_point, rel, data)

    def unmount(self) -> None:
        sh("umount", str(self.mount_point))

    def mount(self) -> None:
        sh("mount", "-t", self.fstype, self.device, str(self.mount_point))


class VolumeFactory:
    def __init__(self, vg: str) -> None:
        self.vg = vg
        self.made: list[Volume] = []

    def __call__(self, kind: str = "thick", fstype: str = "ext4", size_mb: int = 320) -> Volume:
        lv = f"{kind}{fstype}{uuid.uuid4().hex[:6]}"
        if kind == "thick":
            sh("lvm", "lvcreate", "-q", "-y", "-W", "y", "-Z", "y", "-L", f"{size_mb}M", "-n", lv, self.vg)
        else:
            sh("lvm", "lvcreate", "-q", "-V", f"{size_mb}M", "-T", f"{self.vg}/{POOL}", "-n", lv)
        device = f"/dev/mapper/{self.vg}-{lv}"
        mnt = SCRATCH / "mnt" / lv
        mnt.mkdir(parents=True, exist_ok=True)
        vol = Volume(kind=kind, fstype=fstype, lv=lv, device=device, mount_point=mnt)
        self.made.append(vol)
        sh(*MKFS[fstype], device)
        vol.mount()
        return vol

    def close(self) -> None:
        for vol in reversed(self.made):
            subprocess.run(["umount", "-q", str(vol.mount_point)], capture_output=True, check=False)
            # snapcore's snapshots of this LV first (tests may leave them on failure)
            out = subprocess.run(
                ["lvm", "lvs", "--noheadings", "-o", "lv_name", "-S", f"origin={vol.lv}", self.vg],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            for snap in out.split():
                subprocess.run(["lvm", "lvremove", "-q", "-y", f"{self.vg}/{snap}"], capture_output=True, check=False)
            subprocess.run(["lvm", "lvremove", "-q", "-y", vol.ref], capture_output=True, check=False)
            for cleanup in reversed(vol.cleanups):
                cleanup()
        self.made.clear()


def installed(name: str) -> bool:
    """The backend is installed and loads (another team may be halfway through it)."""
    for ep in importlib.metadata.entry_points(group="snapcore"):
        if ep.name == name:
            try:
                ep.load()
            except Exception:
                return False
            return True
    return False
