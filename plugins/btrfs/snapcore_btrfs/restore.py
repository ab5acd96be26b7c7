"""Restoring an image to a directory (``restore --to DIR``): a writable snapshot of it
on its own filesystem, a copy anywhere else.

:func:`check_restore_dest` is also what btrfs-send's restore checks its directory
with. Restoring in place is :mod:`.rollback`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
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
    """A writable snapshot of ``image`` at ``dest`` (new, or an empty directory) on the
    image's own btrfs; a copy of it (:func:`copy_to`) anywhere else."""
    check_restore_dest(dest, mount)
    if recognise(image) is None:
        raise fail(f"{image} is missing or is not a snapshot snapcore made", mount)
    if fsid(nearest_existing(dest)) != fsid(image):
        return copy_to(image, dest, mount)
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


def copy_to(image: Path, dest: Path, mount: str | None = None) -> str:
    """``image``'s tree copied to ``dest`` on another filesystem, as ``cp -a`` copies:
    owners, modes, times, xattrs and ACLs, hard links, symlinks, device nodes, sparse
    files kept; extents shared (reflink) where the target filesystem allows. The copy
    is made in a hidden sibling directory and renamed into place once complete: a
    failed copy leaves nothing at ``dest``. Nested subvolumes are copied as the
    directories the snapshot shows them as."""
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{dest.name}.snapcore-part"
    if staging.is_symlink() or staging.exists():
        raise fail(f"{staging} exists (a copy that did not finish?): remove it, then restore again", mount)
    staging.mkdir(mode=0o700)
    try:
        done = subprocess.run(
            ["cp", "-a", "--reflink=auto", "--sparse=auto", "--", f"{image}/.", os.fspath(staging)],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise fail(f"copying {image} to {dest} failed: {done.stderr.strip()[-400:]}", mount)
        # the snapshot's root: its mode, owner and times, as those of everything below
        st = os.stat(image)
        os.chown(staging, st.st_uid, st.st_gid)
        os.chmod(staging, stat.S_IMODE(st.st_mode))
        if dest.exists():
            dest.rmdir()  # empty (checked): the copy takes its place
        os.rename(staging, dest)
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return f"restored to {dest} (a copy of {image}: another filesystem)"
