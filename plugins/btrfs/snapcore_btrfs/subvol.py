"""The btrfs facts and subvolume primitives every other module of the imager uses.

Is a path on btrfs, and which filesystem (:func:`fsid`); can a mount be
snapshotted, and why not (:func:`check_mount`, all the probe hook needs); which
subvolumes are nested below a mount; and deleting a subvolume with everything
below it, the one delete that snapshotting, discarding, rollback and btrfs-send
share. The backend's name, :func:`fail` and the btrfs constants are here too, so
that loading this module alone (a probe) loads nothing else of the imager.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

import btrfsutil

from snapcore import BackendError, Mount
from snapcore_btrfs import BTRFS

NAME = BTRFS
TOP_LEVEL_ID = 5
#: BTRFS_SUBVOL_RDONLY in SubvolumeInfo.flags.
RDONLY = 1
#: _IOR(BTRFS_IOCTL_MAGIC, 31, struct btrfs_ioctl_fs_info_args): the fsid, with no privilege.
BTRFS_IOC_FS_INFO = 0x8400941F
#: Names snapcore gives to subvolumes it parks during a restore.
STAGING_PREFIX = ".snapcore-"


def fail(message: str, mount: str | None = None) -> BackendError:
    return BackendError(message, mount=mount, backend=NAME)


# -- filesystem facts ------------------------------------------------------------------


def fsid(path: str | os.PathLike[str]) -> str | None:
    """The btrfs filesystem uuid behind ``path``; None when it is not on btrfs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(1024)
        fcntl.ioctl(fd, BTRFS_IOC_FS_INFO, buf, True)
        return bytes(buf[16:32]).hex()
    except OSError:
        return None
    finally:
        os.close(fd)


def is_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def subvolume_name(mount: Mount) -> str:
    return mount.super_option("subvol") or mount.root


def is_read_only(mount: Mount) -> bool:
    return mount.read_only or "ro" in mount.super_options


def check_mount(mount: Mount) -> tuple[bool, str]:
    """Can ``mount`` be snapshotted, and why (not). Cheap: two stats and an ioctl."""
    mp = mount.mount_point
    if mount.fstype != "btrfs":
        return False, f"{mount.fstype} is not btrfs"
    subvol = subvolume_name(mount)
    if is_read_only(mount):
        return False, f"{mp} is mounted read-only: btrfs cannot create a snapshot on it (remount it rw)"
    try:
        if not btrfsutil.is_subvolume(mp):
            return False, (
                f"{mp} shows {mount.root}, a plain directory inside subvolume {subvol}, not a subvolume: "
                "a btrfs snapshot takes a whole subvolume; checkpoint the subvolume's own mount, "
                f"or make {mount.root} a subvolume"
            )
        subvol_id = btrfsutil.subvolume_id(mp)
    except btrfsutil.BtrfsUtilError as exc:
        return False, f"cannot inspect {mp}: {exc}"
    return True, f"btrfs subvolume {subvol} (id {subvol_id}): read-only snapshot, atomic per subvolume"


def nested_subvolumes(root: str | os.PathLike[str], exclude: Sequence[Path] = ()) -> list[str]:
    """Subvolumes below ``root`` (paths relative to it), minus those under ``exclude``."""
    skip = [os.path.relpath(e, root) for e in exclude]
    found: list[str] = []
    with btrfsutil.SubvolumeIterator(os.fspath(root)) as it:
        for rel, _ in it:
            if any(rel == s or rel.startswith(s + "/") for s in skip if not s.startswith("..")):
                continue
            if os.path.basename(rel).startswith(STAGING_PREFIX):
                continue
            found.append(rel)
    return sorted(found)


# -- deleting --------------------------------------------------------------------------


def delete_subvolume_tree(path: Path) -> None:
    """Delete ``path`` and every subvolume below it, read-only ones included."""
    try:
        if not btrfsutil.is_subvolume(os.fspath(path)):
            return
        children = [rel for rel, _ in btrfsutil.SubvolumeIterator(os.fspath(path))]
        if children:
            # a subvolume inside a read-only one cannot be unlinked: unseal first
            btrfsutil.set_subvolume_read_only(os.fspath(path), False)
            for rel in children:
                with contextlib.suppress(btrfsutil.BtrfsUtilError):
                    btrfsutil.set_subvolume_read_only(os.fspath(path / rel), False)
        btrfsutil.delete_subvolume(os.fspath(path), recursive=bool(children))
    except btrfsutil.BtrfsUtilError as exc:
        raise fail(f"cannot delete {path}: {exc}") from exc
