"""btrfs read-only snapshots through libbtrfsutil, in-process; rollback and restore.

Layout of a snapshot directory (default ``<mount>/.snapshots``)::

    <snapshot_dir>/<checkpoint id>                 read-only snapshot of the mounted subvolume
    <snapshot_dir>/<checkpoint id>.snapcore.json   marker: who made it, of what, its uuid

A subvolume counts as snapcore's only when its marker sits next to it, names it,
and records its own uuid: a subvolume someone else put there (or a new one under an
old name) never matches, so it is never deleted.

btrfs cannot snapshot a frozen filesystem (the ioctl blocks until the thaw), and it
does not need to: creating a snapshot flushes the subvolume's dirty data and commits
it in one transaction, so the image holds every write made before the call and none
after. The imager therefore never freezes; the core snapshots all targets in
parallel threads, so several btrfs mounts are imaged within the same few ms.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import btrfsutil

from snapcore import (
    BackendError,
    Consistency,
    Image,
    Mount,
    MountBusy,
    Restored,
    Target,
    mount_holders,
    run_tool,
)
from snapcore_btrfs import BTRFS

if TYPE_CHECKING:  # subprocess and shutil only for restores: the CLI starts fast
    pass

NAME = BTRFS
MARKER_SUFFIX = ".snapcore.json"
MARKER_VERSION = 1
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


# -- markers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Marker:
    """What snapcore wrote next to a snapshot it made."""

    checkpoint_id: str
    mount: str
    subvolume: str
    uuid: str
    source_uuid: str
    created: float
    nested: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "snapcore": MARKER_VERSION,
            "checkpoint_id": self.checkpoint_id,
            "mount": self.mount,
            "subvolume": self.subvolume,
            "uuid": self.uuid,
            "source_uuid": self.source_uuid,
            "created": self.created,
            "nested": list(self.nested),
        }


def marker_path(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + MARKER_SUFFIX)


def read_marker(snapshot: Path) -> Marker | None:
    try:
        data = json.loads(marker_path(snapshot).read_text(encoding="utf-8"))
        return Marker(
            checkpoint_id=str(data["checkpoint_id"]),
            mount=str(data["mount"]),
            subvolume=str(data["subvolume"]),
            uuid=str(data["uuid"]),
            source_uuid=str(data["source_uuid"]),
            created=float(data["created"]),
            nested=tuple(data.get("nested") or ()),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recognise(snapshot: Path) -> Marker | None:
    """The marker of ``snapshot`` when snapcore made it (marker and uuid agree), else None."""
    marker = read_marker(snapshot)
    if marker is None or marker.checkpoint_id != snapshot.name:
        return None
    try:
        info = btrfsutil.subvolume_info(os.fspath(snapshot))
    except btrfsutil.BtrfsUtilError:
        return None
    return marker if info.uuid.hex() == marker.uuid else None


def _write_marker(snapshot: Path, marker: Marker) -> None:
    # no fsync: the snapshot is already committed, and a marker lost in a crash only
    # makes the snapshot unrecognised, i.e. kept forever, never wrongly deleted
    fd = os.open(marker_path(snapshot), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(marker.to_json()).encode())
    finally:
        os.close(fd)


# -- planning and snapshotting ----------------------------------------------------------


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
        _write_marker(plan.dest, marker)
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


# -- restore -----------------------------------------------------------------------------


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


@contextlib.contextmanager
def top_level(mount: Mount) -> Iterator[Path]:
    """The filesystem's top-level subvolume (id 5) mounted in a private temporary directory."""
    import subprocess
    import tempfile  # only for a rollback: keeps the CLI's start short

    where = Path(tempfile.mkdtemp(prefix="snapcore-btrfs-top-"))
    try:
        run_tool(["mount", "-t", "btrfs", "-o", f"subvolid={TOP_LEVEL_ID}", mount.source, str(where)], backend=NAME)
        try:
            yield where
        finally:
            for attempt in range(10):
                done = subprocess.run(["umount", str(where)], capture_output=True, check=False)
                if done.returncode == 0:
                    break
                time.sleep(0.05 * (attempt + 1))
            else:
                subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()


def _carry_nested(old: Path, new: Path, skip: Sequence[str]) -> tuple[list[str], list[str]]:
    """Move ``old``'s nested subvolumes into ``new`` at the same paths (they were not
    part of the image, so they keep their current content, as on a real rollback).
    Returns (moved, left behind)."""
    moved: list[str] = []
    left: list[str] = []
    outer: list[str] = []
    for rel, _ in btrfsutil.SubvolumeIterator(os.fspath(old)):
        if not any(rel.startswith(o + "/") for o in outer):
            outer.append(rel)
    for rel in sorted(outer):
        if rel in skip or any(rel.startswith(s + "/") for s in skip):
            left.append(rel)
            continue
        dst = new / rel
        if dst.exists() or dst.is_symlink():
            if dst.is_dir() and not dst.is_symlink() and is_empty(dst) and not _is_subvolume(dst):
                dst.rmdir()  # the placeholder the image holds for it
            else:
                left.append(rel)
                continue
        if not dst.parent.is_dir():
            left.append(rel)
            continue
        move_subvolume(old / rel, dst)
        moved.append(rel)
    return moved, left


def move_subvolume(src: Path, dst: Path) -> None:
    """Rename a subvolume; a read-only one is unsealed for the move (btrfs refuses
    EROFS otherwise: the move rewrites its root's parent link) and sealed again."""
    sealed = btrfsutil.get_subvolume_read_only(os.fspath(src))
    if sealed:
        btrfsutil.set_subvolume_read_only(os.fspath(src), False)
    try:
        os.rename(src, dst)
    finally:
        btrfsutil.set_subvolume_read_only(os.fspath(dst if dst.exists() else src), sealed)
    # a snapshot's marker goes with it (a plain file cannot be renamed across subvolumes)
    marker = marker_path(src)
    if marker.exists():
        import shutil

        shutil.copy2(marker, marker_path(dst))
        marker.unlink()


def _is_subvolume(path: Path) -> bool:
    try:
        return bool(btrfsutil.is_subvolume(os.fspath(path)))
    except btrfsutil.BtrfsUtilError:
        return False


def rollback(
    mount: Mount,
    checkpoint_id: str,
    image: Path | None = None,
    receive: Callable[[Path], Path] | None = None,
    skip_nested: Sequence[str] = (),
    snapshot_dir: Path | None = None,
) -> Restored:
    """Put a writable copy of ``image`` (or of what ``receive`` stages) in place of the
    mounted subvolume, and mount it again: the mount shows the restored state when
    this returns (a restored program starts on it next).

    The current subvolume is never deleted: it becomes a read-only image of its own in
    ``snapshot_dir`` (marked, like every snapshot snapcore makes), which the core
    records as a checkpoint (``Restored.set_aside``). A mount in use (processes, mounts
    below it) cannot be switched now: :class:`MountBusy` names the holders before
    anything is changed, and if a holder appears after the swap, the swap is undone.
    Any other failure before the swap undoes every step too.
    """
    mp = mount.mount_point
    ok, reason = check_mount(mount)
    if not ok:
        raise fail(f"cannot roll back in place: {reason}", mp)
    if mount.root == "/" or mount.super_option("subvolid") == str(TOP_LEVEL_ID):
        raise fail(
            "cannot roll back in place: the mount shows the top-level subvolume (id 5), which cannot be "
            "replaced; restore with --to DIR instead (and keep your data in a subvolume next time)",
            mp,
        )
    if image is not None and recognise(image) is None:
        raise fail(f"cannot roll back in place: {image} is missing or is not a snapshot snapcore made", mp)
    old_id = btrfsutil.subvolume_id(mp)
    pinned = fstab_subvolid(mp)
    if pinned is not None and pinned == str(old_id):
        raise fail(
            f"cannot roll back in place: {FSTAB} mounts {mp} by subvolid={pinned}, and after a rollback that id "
            f"is the previous state, kept aside: the next mount would not show the restored one. Change the "
            f"option to subvol={mount.root} in {FSTAB} first (nothing was changed)",
            mp,
        )
    holders = mount_holders(mp)
    if holders:
        raise MountBusy(mp, holders, backend=BTRFS)
    # unique per call: two restores within one second never collide on a name
    token = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()
    aside_id = f"before-restore-{token}"
    left: list[str] = []
    with top_level(mount) as top:
        current = top / mount.root.strip("/")
        if not _is_subvolume(current) or btrfsutil.subvolume_id(os.fspath(current)) != old_id:
            raise fail(f"cannot roll back in place: {mount.root} is no longer the subvolume mounted at {mp}", mp)
        staged = current.with_name(f"{current.name}{STAGING_PREFIX}restoring-{checkpoint_id}-{token}")
        aside = current.with_name(f"{current.name}{STAGING_PREFIX}{aside_id}")
        for p in (staged, aside):
            if p.exists():
                raise fail(f"cannot roll back in place: {p.name} already exists next to {mount.root}", mp)
        staging: Path | None = None
        if receive is not None:
            staging = top / f"{STAGING_PREFIX}receive-{checkpoint_id}-{os.urandom(3).hex()}"
            staging.mkdir()
        try:
            source = receive(staging) if receive is not None and staging is not None else image
            assert source is not None
            try:
                btrfsutil.create_snapshot(os.fspath(source), os.fspath(staged), recursive=True, read_only=False)
                for rel, _ in btrfsutil.SubvolumeIterator(os.fspath(staged)):
                    btrfsutil.set_subvolume_read_only(os.fspath(staged / rel), False)
            except btrfsutil.BtrfsUtilError as exc:
                with contextlib.suppress(BackendError):
                    delete_subvolume_tree(staged)
                raise fail(f"cannot roll back in place: making the restored copy failed: {exc}", mp) from exc
            restored_nested = [rel for rel, _ in btrfsutil.SubvolumeIterator(os.fspath(staged))]
            moved: list[str] = []
            try:
                moved, left = _carry_nested(current, staged, [*skip_nested, *restored_nested])
                _swap(current, staged, aside)
            except OSError as exc:
                _undo(current, staged, moved)
                raise fail(f"cannot roll back in place: {exc}; nothing was changed", mp) from exc
            new_id = btrfsutil.subvolume_id(os.fspath(current))
            default_moved = btrfsutil.get_default_subvolume(os.fspath(top)) == old_id
            if default_moved:
                btrfsutil.set_default_subvolume(os.fspath(current))
            busy = _unmount(mp)
            if busy is not None:
                # something started using the mount after the check: put everything back
                if default_moved:
                    btrfsutil.set_default_subvolume(os.fspath(aside))
                _swap(current, aside, staged)  # the restored copy goes back to its staged name
                _undo(current, staged, moved)
                raise MountBusy(mp, mount_holders(mp) or [busy], backend=BTRFS)
        finally:
            if staging is not None:
                for child in list(staging.iterdir()):
                    with contextlib.suppress(BackendError):
                        delete_subvolume_tree(child)
                with contextlib.suppress(OSError):
                    staging.rmdir()
    _mount_again(mount)
    done = f"rolled back in place (subvolume {mount.root} is now id {new_id}); {mp} was mounted again"
    nested = f" (with its nested subvolumes {', '.join(left)})" if left else ""
    try:
        set_aside = _keep_aside(mount, aside.name, aside_id, snapshot_dir, tuple(left))
    except (OSError, btrfsutil.BtrfsUtilError) as exc:
        kept_as = os.path.join(os.path.dirname(mount.root), aside.name)
        return Restored(
            message=f"{done}; the previous state{nested} is kept as subvolume {kept_as} "
            f"(not moved into the snapshot_dir: {exc})"
        )
    return Restored(
        message=f"{done}; the previous state{nested} is kept as {set_aside.ref}",
        set_aside=set_aside,
        set_aside_id=aside_id,
    )


def _swap(current: Path, new: Path, aside: Path) -> None:
    """``current`` → ``aside`` and ``new`` → ``current``, or neither."""
    os.rename(current, aside)
    try:
        os.rename(new, current)
    except OSError:
        os.rename(aside, current)
        raise


def _undo(current: Path, staged: Path, moved: Sequence[str]) -> None:
    """Give ``current`` back the nested subvolumes carried into ``staged``; drop ``staged``."""
    for rel in reversed(moved):
        move_subvolume(staged / rel, current / rel)
    with contextlib.suppress(BackendError):
        delete_subvolume_tree(staged)


def _from_top(path: Path) -> Path:
    """Where ``path`` (not there yet; its directory is) is, relative to the top-level
    subvolume: the path of the subvolume holding its directory, and the rest."""
    root = path.parent
    while not _is_subvolume(root):
        if root.parent == root:
            raise OSError(errno.ENOENT, f"no btrfs subvolume holds {path}")
        root = root.parent
    return Path(btrfsutil.subvolume_path(os.fspath(root))) / os.path.relpath(path, root)


def _keep_aside(mount: Mount, name: str, aside_id: str, snapshot_dir: Path | None, nested: tuple[str, ...]) -> Image:
    """Move the replaced subvolume (unmounted now, named ``name`` next to the mounted
    one) into ``snapshot_dir`` as ``aside_id``, read-only and marked: an image like
    those checkpoints make."""
    snapdir = snapshot_dir or Path(mount.mount_point) / ".snapshots"
    snapdir.mkdir(mode=0o700, exist_ok=True)
    dest = snapdir / aside_id
    if fsid(snapdir) != fsid(mount.mount_point):
        raise OSError(errno.EXDEV, f"{snapdir} is on another filesystem")
    there = _from_top(dest)
    with top_level(mount) as top:
        # both names through the one top-level mount: rename(2) never crosses mounts
        os.rename((top / mount.root.strip("/")).with_name(name), top / there)
    source_uuid = btrfsutil.subvolume_info(mount.mount_point).uuid.hex()
    btrfsutil.set_subvolume_read_only(os.fspath(dest), True)
    uuid = btrfsutil.subvolume_info(os.fspath(dest)).uuid.hex()
    created = time.time()
    marker = Marker(
        checkpoint_id=aside_id,
        mount=mount.mount_point,
        subvolume=mount.root,
        uuid=uuid,
        source_uuid=source_uuid,
        created=created,
        nested=nested,
    )
    _write_marker(dest, marker)
    return Image(
        backend=BTRFS,
        ref=os.fspath(dest),
        # the live tree as it was when nothing used it (no holder): as after a clean
        # unmount, but nobody froze it
        consistency=Consistency.CRASH_CONSISTENT,
        path=os.fspath(dest),
        details={
            "uuid": uuid,
            "source_uuid": source_uuid,
            "subvolume": mount.root,
            "created": created,
            "snapshot_dir": os.fspath(snapdir),
            "set_aside": True,
            "nested": list(nested),
            "recursive": bool(nested),
        },
    )


#: Where the mounts made at boot are listed (a test points it elsewhere).
FSTAB = "/etc/fstab"


def fstab_subvolid(mount_point: str) -> str | None:
    """The ``subvolid=`` that :data:`FSTAB` mounts ``mount_point`` with, if any."""
    try:
        with open(FSTAB, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[0].startswith("#"):
            continue
        where = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if os.path.normpath(where) != os.path.normpath(mount_point):
            continue
        for option in fields[3].split(","):
            if option.startswith("subvolid="):
                return option.partition("=")[2]
    return None


def _unmount(mp: str) -> str | None:
    """Unmount ``mp``; None when done, else why not (umount's words)."""
    import subprocess

    done = subprocess.run(["umount", mp], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    return done.stderr.strip() or f"umount {mp} exited with status {done.returncode}"


def _mount_again(mount: Mount) -> None:
    mp = mount.mount_point
    opts = [o for o in mount.mount_options if o not in ("rw", "ro")]
    opts += [o for o in mount.super_options if not o.startswith(("subvolid=", "subvol=")) and o not in ("rw", "ro")]
    opts.append("ro" if mount.read_only else "rw")
    opts.append(f"subvol={mount.root}")
    run_tool(["mount", "-t", "btrfs", "-o", ",".join(dict.fromkeys(opts)), mount.source, mp], backend=NAME, mount=mp)
