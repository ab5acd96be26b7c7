"""Taking a snapshot: the plan ``prepare`` makes, the sync, and the snapshot itself.

btrfs cannot snapshot a frozen filesystem (the ioctl blocks until the thaw), and it
does not need to: creating a snapshot flushes the subvolume's dirty data and commits
it in one transaction, so the image holds every write made before the call and none
after. The imager therefore never freezes; the core snapshots all targets in
parallel threads, so several btrfs mounts are imaged within the same few ms.

Everything between ``prepare`` and ``thaw`` is here, and nothing else: what runs
inside the window can be read in one place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import btrfsutil

from snapcore import BackendError, Target
from snapcore_btrfs.markers import Marker, marker_path, write_marker
from snapcore_btrfs.subvol import (
    NAME,
    check_mount,
    delete_subvolume_tree,
    fail,
    fsid,
    nearest_existing,
    nested_subvolumes,
    subvolume_name,
)


@dataclass(slots=True, kw_only=True)
class Plan:
    """What ``prepare`` worked out for one target, for ``snapshot`` to use at once."""

    mount: str
    subvolume: str
    snapshot_dir: Path
    dest: Path
    recursive: bool
    source_uuid: str
    nested: list[str] = field(default_factory=list)


def snapshot_dir_of(target: Target) -> Path:
    opts = target.options_for(NAME)
    return Path(opts.get("snapshot_dir") or os.path.join(target.mount.mount_point, ".snapshots"))


def plan(target: Target, *, create: bool) -> Plan:
    """Check ``target`` and (``create``) make its snapshot directory. Nothing is frozen."""
    mount = target.mount
    mp = mount.mount_point
    ok, reason = check_mount(mount)
    if not ok:
        raise fail(reason, mp)
    snapdir = snapshot_dir_of(target)
    if snapdir.exists() and not snapdir.is_dir():
        raise fail(f"snapshot_dir {snapdir} exists and is not a directory: remove it or choose another path", mp)
    here = fsid(mp)
    there = fsid(nearest_existing(snapdir))
    if there != here:
        raise fail(
            f"snapshot_dir {snapdir} is on another filesystem than {mp}: a btrfs snapshot can only be made "
            "on the filesystem it is taken from; choose a directory on the same btrfs",
            mp,
        )
    if create and not snapdir.exists():
        try:
            snapdir.mkdir(parents=True, mode=0o750)
        except OSError as exc:
            raise fail(f"cannot create snapshot_dir {snapdir}: {exc.strerror}", mp) from exc
    dest = snapdir / target.checkpoint_id
    if dest.exists() or marker_path(dest).exists():
        raise fail(f"{dest} already exists: checkpoint ids must be unique per snapshot_dir", mp)
    try:
        nested = nested_subvolumes(mp, exclude=[snapdir])
        source_uuid = btrfsutil.subvolume_info(mp).uuid.hex()
    except btrfsutil.BtrfsUtilError as exc:
        raise fail(f"cannot list the subvolumes below {mp}: {exc}", mp) from exc
    return Plan(
        mount=mp,
        subvolume=subvolume_name(mount),
        snapshot_dir=snapdir,
        dest=dest,
        recursive=bool(target.options_for(NAME).get("recursive", False)),
        source_uuid=source_uuid,
        nested=nested,
    )


def sync(plan: Plan) -> None:
    """Write back the filesystem holding ``plan``'s mount, outside any window.

    ``BTRFS_IOC_SYNC`` through libbtrfsutil: it starts the write-back of every
    subvolume's delayed allocations and commits the transaction, as ``syncfs(2)`` does
    for btrfs, without loading ctypes (~1 ms of the CLI's start) for the call.
    """
    try:
        btrfsutil.sync(plan.mount)
    except btrfsutil.BtrfsUtilError as exc:
        raise fail(f"sync failed: {exc}", plan.mount) from exc


def _snapshot_error(exc: btrfsutil.BtrfsUtilError, plan: Plan) -> BackendError:
    if exc.errno == errno.ENOSPC:
        why = (
            "no space left on the filesystem for the snapshot: free some space, or prune old images ('snapcore prune')"
        )
    elif exc.errno == errno.EROFS:
        why = "the filesystem or the snapshot_dir is read-only"
    elif exc.errno == errno.EEXIST:
        why = f"{plan.dest} already exists"
    elif exc.errno == errno.EXDEV:
        why = f"snapshot_dir {plan.snapshot_dir} is on another filesystem"
    else:
        why = str(exc)
    return fail(f"snapshot to {plan.dest} failed: {why}", plan.mount)


def take_snapshot(plan: Plan, checkpoint_id: str) -> tuple[Marker, list[str]]:
    """Make the read-only snapshot (and nested ones when ``recursive``) and its marker.

    Runs inside the freeze window: nothing here but ioctls and one small write.
    Returns the marker and the warnings for the manifest.
    """
    warnings: list[str] = []
    nested = plan.nested if plan.recursive else []
    try:
        if nested:
            _recursive_snapshot(plan, nested)
        else:
            btrfsutil.create_snapshot(plan.mount, os.fspath(plan.dest), read_only=True)
    except btrfsutil.BtrfsUtilError as exc:
        if nested:
            with contextlib.suppress(BackendError):
                delete_subvolume_tree(plan.dest)
        raise _snapshot_error(exc, plan) from exc
    created = time.time()
    try:
        marker = Marker(
            checkpoint_id=checkpoint_id,
            mount=plan.mount,
            subvolume=plan.subvolume,
            uuid=btrfsutil.subvolume_info(os.fspath(plan.dest)).uuid.hex(),
            source_uuid=plan.source_uuid,
            created=created,
            nested=tuple(nested),
        )
        write_marker(plan.dest, marker)
    except (OSError, btrfsutil.BtrfsUtilError) as exc:
        # an unmarked snapshot would be kept forever: take it back now
        with contextlib.suppress(BackendError):
            delete_subvolume_tree(plan.dest)
        with contextlib.suppress(OSError):
            marker_path(plan.dest).unlink()
        why = "no space left for its marker file" if exc.errno == errno.ENOSPC else str(exc)
        raise fail(f"snapshot {plan.dest} was made but not recorded ({why}); it was deleted again", plan.mount) from exc
    if plan.nested and not plan.recursive:
        warnings.append(
            f"nested subvolume(s) not in the snapshot (a btrfs snapshot stops at subvolume boundaries; "
            f"they are empty directories in it): {', '.join(plan.nested)}; set 'recursive: true' to snapshot them too"
        )
    elif nested:
        warnings.append(
            f"{len(nested)} nested subvolume(s) snapshotted one after another ({', '.join(nested)}): "
            "each is atomic, the set is not one instant"
        )
    return marker, warnings


def _recursive_snapshot(plan: Plan, nested: list[str]) -> None:
    # libbtrfsutil's RECURSIVE flag cannot be combined with READ_ONLY (it creates the
    # children inside the new snapshot) and would also descend into snapshot_dir:
    # make each snapshot writable, fill in the children, then seal bottom-up.
    made = [plan.dest]
    btrfsutil.create_snapshot(plan.mount, os.fspath(plan.dest), read_only=False)
    for rel in nested:
        dst = plan.dest / rel
        os.rmdir(dst)  # the empty placeholder a snapshot holds for a nested subvolume
        btrfsutil.create_snapshot(os.path.join(plan.mount, rel), os.fspath(dst), read_only=False)
        made.append(dst)
    for path in reversed(made):
        btrfsutil.set_subvolume_read_only(os.fspath(path), True)
