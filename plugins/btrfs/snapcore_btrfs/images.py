"""The snapshots snapcore made, after the checkpoint: delete, list, verify.

What the ``discard``, ``list_images`` and ``verify`` hooks do with an image that
exists; each trusts a subvolume only through its marker (:mod:`.markers`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import btrfsutil

from snapcore import Mount
from snapcore_btrfs.markers import Marker, marker_path, read_marker, recognise
from snapcore_btrfs.subvol import RDONLY, TOP_LEVEL_ID, delete_subvolume_tree, fail, fsid, nearest_existing

# -- deleting --------------------------------------------------------------------------


def delete_image(snapshot: Path, *, checkpoint_id: str | None = None, uuid: str | None = None) -> bool:
    """Delete a snapshot snapcore made; False when it is already gone.

    Refuses (raises) for a subvolume without a matching marker: never delete what
    snapcore did not create; for one whose marker names another checkpoint than
    ``checkpoint_id``, or whose uuid is not ``uuid`` (a manifest, perhaps tampered
    with, pointing at another checkpoint's snapshot); and for a path no btrfs is
    mounted under now (the snapshot is out of reach, not gone: saying it was deleted
    would lose track of it).
    """
    marker = marker_path(snapshot)
    if not snapshot.exists() and fsid(nearest_existing(snapshot.parent)) is None:
        raise fail(f"cannot reach {snapshot}: no btrfs is mounted there now; mount it, then try again")
    if not snapshot.exists():
        with contextlib.suppress(OSError):
            if read_marker(snapshot) is not None:
                marker.unlink()
        return False
    found = recognise(snapshot)
    if found is None:
        raise fail(f"refusing to delete {snapshot}: it is not a snapshot snapcore made (no matching {marker.name})")
    if checkpoint_id is not None and found.checkpoint_id != checkpoint_id:
        raise fail(f"refusing to delete {snapshot}: it is checkpoint {found.checkpoint_id}'s, not {checkpoint_id}'s")
    if uuid is not None and found.uuid != uuid:
        raise fail(f"refusing to delete {snapshot}: its uuid is {found.uuid}, the manifest says {uuid}")
    delete_subvolume_tree(snapshot)
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    return True


# -- inventory and checks -----------------------------------------------------------------


def _mount_lines() -> list[tuple[str, str, str, str]]:
    """(major:minor, root, mount point, fstype) of every mount, from mountinfo."""

    def unescape(s: str) -> str:
        return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")

    rows = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-", 6)
            rows.append((fields[2], unescape(fields[3]), unescape(fields[4]), fields[sep + 1]))
    return rows


def accessible_path(mount: Mount, top_relative: str) -> Path | None:
    """Where a subvolume given relative to the top-level is reachable through a mount."""
    devnum = f"{mount.major}:{mount.minor}"
    wanted = "/" + top_relative.strip("/")
    # through the mount itself first, so that the path is the one the manifests record
    mounts = [(devnum, mount.root, mount.mount_point, "btrfs"), *_mount_lines()]
    for dev, root, mount_point, fstype in mounts:
        if dev != devnum or fstype != "btrfs":
            continue
        prefix = root.rstrip("/")
        if wanted == prefix or wanted.startswith(prefix + "/"):
            return Path(mount_point + wanted[len(prefix) :])
    return None


def list_images(mount: Mount) -> list[tuple[Path, Marker]]:
    """Every snapshot snapcore made of ``mount`` that a mount makes reachable, newest first."""
    found: list[tuple[Path, Marker]] = []
    with btrfsutil.SubvolumeIterator(mount.mount_point, top=TOP_LEVEL_ID, info=True) as it:
        for rel, info in it:
            if not info.flags & RDONLY:
                continue
            path = accessible_path(mount, rel)
            if path is None:
                continue
            marker = read_marker(path)
            if marker is None or marker.mount != mount.mount_point or marker.uuid != info.uuid.hex():
                continue
            if marker.checkpoint_id != path.name:
                continue
            found.append((path, marker))
    found.sort(key=lambda e: e[1].created, reverse=True)
    return found


def verify_image(snapshot: Path, expected_uuid: str | None) -> list[str]:
    if not snapshot.exists():
        return [f"snapshot {snapshot} is missing"]
    try:
        info = btrfsutil.subvolume_info(os.fspath(snapshot))
    except btrfsutil.BtrfsUtilError as exc:
        return [f"{snapshot} is not a btrfs subvolume any more: {exc}"]
    problems = []
    if not info.flags & RDONLY:
        problems.append(f"snapshot {snapshot} is no longer read-only: it may have been changed")
    if expected_uuid and info.uuid.hex() != expected_uuid:
        problems.append(f"{snapshot} is another subvolume than the one snapcore made (uuid changed)")
    if read_marker(snapshot) is None:
        problems.append(f"the marker {marker_path(snapshot).name} is missing: snapcore will not delete this snapshot")
    return problems
