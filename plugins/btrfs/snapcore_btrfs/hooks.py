"""pluggy hooks of the ``btrfs`` imager; the work is in :mod:`.subvol` (probe),
:mod:`.snapshot` (prepare, snapshot), :mod:`.images` (discard, list, verify),
:mod:`.restore` (``--to``) and :mod:`.rollback` (``--in-place``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from snapcore import (
    BackendError,
    BackendInfo,
    Consistency,
    Export,
    Image,
    ImageEntry,
    Mount,
    Option,
    OptionKind,
    Restored,
    Role,
    Support,
    Target,
    hookimpl,
    lazy_import,
)
from snapcore_btrfs import BTRFS as NAME

if TYPE_CHECKING:
    from snapcore_btrfs import images, restore, rollback, snapshot, subvol
else:  # btrfsutil is loaded when a btrfs mount is really met: the CLI starts fast
    images = lazy_import("snapcore_btrfs.images")
    restore = lazy_import("snapcore_btrfs.restore")
    rollback = lazy_import("snapcore_btrfs.rollback")
    snapshot = lazy_import("snapcore_btrfs.snapshot")
    subvol = lazy_import("snapcore_btrfs.subvol")


@hookimpl
def snapcore_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        roles=frozenset({Role.IMAGER}),
        description="btrfs read-only subvolume snapshot (libbtrfsutil), atomic per subvolume, no freeze",
    )


@hookimpl
def snapcore_option_schema() -> Sequence[Option]:
    return (
        Option(
            name="snapshot_dir",
            kind=OptionKind.PATH,
            help="where snapshots go, on the same btrfs (default: <mount>/.snapshots, created if missing)",
        ),
        Option(
            name="recursive",
            kind=OptionKind.BOOL,
            default=False,
            help="also snapshot the subvolumes nested below the mount (each atomic on its own)",
        ),
        Option(
            name="sync",
            kind=OptionKind.BOOL,
            default=True,
            help="sync the filesystem in prepare (btrfs's own sync ioctl), so the snapshot's own flush is short",
        ),
    )


@hookimpl
def snapcore_probe(mount: Mount) -> Support:
    if mount.fstype != "btrfs":
        return Support.no(f"{mount.fstype} is not btrfs")
    ok, reason = subvol.check_mount(mount)
    # above fsfreeze (20): a snapshot keeps an image and never holds writers
    return Support.yes(reason, score=80) if ok else Support.no(reason)


@hookimpl
def snapcore_prepare(target: Target, role: Role) -> None:
    plan = snapshot.plan(target, create=True)
    if target.options_for(NAME).get("sync", True):
        snapshot.sync(plan)
    target.state_of(NAME)["plan"] = plan  # for snapshot


@hookimpl
def snapcore_freeze(target: Target) -> None:
    # btrfs cannot snapshot a frozen filesystem (the ioctl waits for the thaw), and the
    # snapshot is atomic on its own: there is nothing to freeze
    return None


@hookimpl
def snapcore_snapshot(target: Target) -> Image:
    plan = target.state_of(NAME).pop("plan", None)
    if plan is None:  # prepare ran in another process, or not at all
        plan = snapshot.plan(target, create=False)
    marker, warnings = snapshot.take_snapshot(plan, target.checkpoint_id)
    return Image(
        backend=NAME,
        ref=os.fspath(plan.dest),
        # Not ATOMIC: btrfs cannot snapshot a frozen filesystem, and a write racing
        # with the ioctl (after its delalloc flush, before its commit) can land with
        # its metadata but without its data, as after a power cut. Writes completed
        # before the call are all in. With the writing tasks frozen (a later issue:
        # tasks) nothing races and the image is one instant per subvolume.
        consistency=Consistency.CRASH_CONSISTENT,
        path=os.fspath(plan.dest),
        details={
            "uuid": marker.uuid,
            "source_uuid": marker.source_uuid,
            "subvolume": marker.subvolume,
            "created": marker.created,
            "snapshot_dir": os.fspath(plan.snapshot_dir),
            "atomic": "per subvolume, for writes completed before the snapshot",
            "nested": list(plan.nested),
            "recursive": bool(marker.nested),
            "warnings": warnings,
        },
    )


@hookimpl
def snapcore_thaw(target: Target) -> None:
    return None


@hookimpl
def snapcore_discard(target: Target, image: Image | None, export: Export | None) -> None:
    target.state_of(NAME).pop("plan", None)
    if export is not None or image is None or image.ref is None:
        return
    uuid = image.details.get("uuid")
    images.delete_image(
        Path(image.ref), checkpoint_id=target.checkpoint_id, uuid=uuid if isinstance(uuid, str) else None
    )


@hookimpl
def snapcore_list_images(mount: Mount) -> Sequence[ImageEntry]:
    if mount.fstype != "btrfs":
        return []
    return [
        ImageEntry(backend=NAME, ref=os.fspath(path), checkpoint_id=marker.checkpoint_id, created=marker.created)
        for path, marker in images.list_images(mount)
    ]


@hookimpl
def snapcore_restore(
    target: Target, image: Image | None, export: Export | None, dest: Path | None, in_place: bool
) -> str | Restored:
    mp = target.mount.mount_point
    if image is None or image.ref is None:
        raise BackendError("the checkpoint has no btrfs image to restore from", mount=mp, backend=NAME)
    if in_place:
        return rollback.rollback(
            target.mount, target.checkpoint_id, image=Path(image.ref), snapshot_dir=Path(image.ref).parent
        )
    if dest is None:
        raise BackendError("restore needs --to DIR or --in-place", mount=mp, backend=NAME)
    return restore.restore_to(Path(image.ref), dest, mp)


@hookimpl
def snapcore_verify(target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
    if image is None or image.ref is None:
        return ["no btrfs image is recorded"]
    return images.verify_image(Path(image.ref), image.details.get("uuid"))
