"""Restoring an image to a directory (``restore --to DIR``): a writable snapshot of it.

:func:`check_restore_dest` is also what btrfs-send's restore checks its directory
with. Restoring in place is :mod:`.rollback`.
"""

from __future__ import annotations

import os
from pathlib import Path

import btrfsutil

from snapcore_btrfs.markers import recognise
from snapcore_btrfs.subvol import fail, fsid, is_empty, nearest_existing


def check_restore_dest(dest: Path, mount: str | None = None) -> None:
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise fail(f"restore target {dest} exists and is not a directory", mount)
    if dest.exists():
        if not is_empty(dest):
            raise fail(
                f"restore target {dest} is not empty: refusing to restore over existing files; "
                "give a new or an empty directory",
                mount,
            )
        if os.path.ismount(dest):
            raise fail(f"restore target {dest} is a mount point: give a directory inside it", mount)


def restore_to(image: Path, dest: Path, mount: str | None = None) -> str:
    """A writable snapshot of ``image`` at ``dest`` (new, or an empty directory)."""
    check_restore_dest(dest, mount)
    if recognise(image) is None:
        raise fail(f"{image} is missing or is not a snapshot snapcore made", mount)
    if fsid(nearest_existing(dest)) != fsid(image):
        raise fail(
            f"{dest} is not on the btrfs filesystem of {image}: a snapshot can only be restored on its own "
            "filesystem; restore from a btrfs-send export, or copy the read-only image",
            mount,
        )
    if dest.exists():
        dest.rmdir()
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        btrfsutil.create_snapshot(os.fspath(image), os.fspath(dest), recursive=True, read_only=False)
    except btrfsutil.BtrfsUtilError as exc:
        raise fail(f"cannot create {dest} from {image}: {exc}", mount) from exc
    nested = [rel for rel, _ in btrfsutil.SubvolumeIterator(os.fspath(dest))]
    for rel in nested:  # the copies of nested read-only snapshots must be writable too
        btrfsutil.set_subvolume_read_only(os.fspath(dest / rel), False)
    return f"restored to {dest} (a writable snapshot of {image})"
