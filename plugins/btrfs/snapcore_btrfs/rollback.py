"""Rolling a mounted subvolume back in place (``restore --in-place``).

The mounted subvolume is swapped for a writable copy of the image (or of what
btrfs-send receives) through the filesystem's top-level subvolume, mounted
privately; its nested subvolumes are carried over, the replaced state is kept
aside as a marked read-only image, and the mount is made again. Every step is
undone when one fails or a holder of the mount appears. The largest single piece
of the imager, and one thing: kept apart from the snapshot path, which it shares
only the subvolume primitives and the markers with.

subprocess, tempfile and shutil are imported inside the functions that need them:
only a rollback does, and the CLI starts fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import btrfsutil

from snapcore import (
    BackendError,
    Consistency,
    Image,
    Mount,
    MountBusy,
    Restored,
    mount_holders,
    run_tool,
)
from snapcore_btrfs import BTRFS
from snapcore_btrfs.markers import Marker, marker_path, recognise, write_marker
from snapcore_btrfs.subvol import (
    NAME,
    STAGING_PREFIX,
    TOP_LEVEL_ID,
    check_mount,
    delete_subvolume_tree,
    fail,
    fsid,
    is_empty,
)


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
    write_marker(dest, marker)
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
