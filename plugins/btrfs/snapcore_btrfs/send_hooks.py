"""pluggy hooks of the ``btrfs-send`` exporter; the work is in :mod:`.send`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore import (
    BackendError,
    BackendInfo,
    Export,
    Image,
    Option,
    OptionKind,
    Restored,
    Role,
    Target,
    hookimpl,
    lazy_import,
)
from snapcore_btrfs import BTRFS
from snapcore_btrfs import BTRFS_SEND as NAME

if TYPE_CHECKING:
    from snapcore_btrfs import rollback, send, snapshot
else:  # loaded when a target really exports with btrfs send: the CLI starts fast
    rollback = lazy_import("snapcore_btrfs.rollback")
    send = lazy_import("snapcore_btrfs.send")
    snapshot = lazy_import("snapcore_btrfs.snapshot")


def fail(message: str, mount: str | None = None) -> BackendError:
    return send.fail(message, mount)


@hookimpl
def snapcore_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        roles=frozenset({Role.EXPORTER}),
        description="btrfs send stream of a btrfs snapshot (optionally zstd), incremental against the last export",
    )


@hookimpl
def snapcore_option_schema() -> Sequence[Option]:
    return (
        Option(
            name="dest",
            kind=OptionKind.PATH,
            help="directory for the streams (default: STATE/checkpoints/ID/exports/btrfs-send); "
            "share it between checkpoints to get incremental streams",
        ),
        Option(name="compress", kind=OptionKind.CHOICE, default="none", choices=("none", "zstd"), help="compression"),
        Option(
            name="incremental",
            kind=OptionKind.BOOL,
            default=True,
            help="send against the previous export of the same mount (-p) when its snapshot still exists",
        ),
        Option(
            name="precopy",
            kind=OptionKind.BOOL,
            default=False,
            help="before the freeze, snapshot the live subvolume and send it; the checkpoint's stream is then "
            "incremental against it (live migration's pre-copy)",
        ),
    )


@hookimpl
def snapcore_prepare(target: Target, role: Role) -> None:
    if target.imager != BTRFS:
        raise fail(
            f"btrfs-send exports btrfs snapshots, not images of {target.imager!r}: use 'imager: btrfs'",
            target.mount.mount_point,
        )
    send.need_tools(str(target.options_for(NAME).get("compress") or "none"))


def _dest(target: Target, export: Export | None = None) -> Path:
    if export is not None and export.path:
        return Path(export.path)
    dest = target.options_for(NAME).get("dest")
    return Path(dest) if dest else target.checkpoint_dir / "exports" / NAME


@hookimpl
def snapcore_precopy(target: Target, dest: Path) -> Sequence[Mapping[str, Any]]:
    opts = target.options_for(NAME)
    if not opts.get("precopy"):
        return []
    return send.precopy(
        checkpoint_id=target.checkpoint_id,
        mount=target.mount.mount_point,
        snapshot_dir=snapshot.snapshot_dir_of(target),
        dest=dest,
        compress=str(opts.get("compress") or "none"),
        incremental=bool(opts.get("incremental", True)),
        cancel=target.cancel,
    )


@hookimpl
def snapcore_export(target: Target, image: Image, dest: Path) -> Export:
    if image.path is None:
        raise fail("the image has no path to send", target.mount.mount_point)
    opts = target.options_for(NAME)
    record, notes = send.export(
        checkpoint_id=target.checkpoint_id,
        mount=target.mount.mount_point,
        snapshot=Path(image.path),
        dest=dest,
        compress=str(opts.get("compress") or "none"),
        incremental=bool(opts.get("incremental", True)),
        cancel=target.cancel,
    )
    if opts.get("precopy"):
        # sent, and the checkpoint's stream is against it: the pre-copy's snapshot can go
        send.drop_precopy_snapshot(snapshot.snapshot_dir_of(target), target.checkpoint_id)
    return Export(
        backend=NAME,
        ref=os.fspath(dest / record.stream),
        path=os.fspath(dest),
        details={
            "parent": record.parent,
            "chain": list(record.chain),
            "size": record.size,
            "sha256": record.sha256,
            "compress": record.compress,
            "warnings": notes,
        },
    )


@hookimpl
def snapcore_discard(target: Target, image: Image | None, export: Export | None) -> None:
    if export is None:
        return
    send.discard(_dest(target, export), target.checkpoint_id)


@hookimpl
def snapcore_discard_partial(target: Target, dest: Path) -> Sequence[str]:
    done = send.discard_partial(dest, target.checkpoint_id)
    if send.drop_precopy_snapshot(snapshot.snapshot_dir_of(target), target.checkpoint_id):
        done.append(f"removed the pre-copy snapshot {send.precopy_id(target.checkpoint_id)}")
    return done


@hookimpl
def snapcore_restore(
    target: Target, image: Image | None, export: Export | None, dest: Path | None, in_place: bool
) -> str | Restored:
    mp = target.mount.mount_point
    if export is None:
        raise fail("the checkpoint has no btrfs-send export", mp)
    where = _dest(target, export)
    record = send.load(where, target.checkpoint_id, mp)
    if in_place:
        problems = send.check_chain(where, record)
        if problems:
            raise fail("cannot restore: " + "; ".join(problems), mp)
        return rollback.rollback(
            target.mount,
            target.checkpoint_id,
            receive=lambda staging: send.receive(where, record, staging, mp),
            snapshot_dir=snapshot.snapshot_dir_of(target),
        )
    if dest is None:
        raise fail("restore needs --to DIR or --in-place", mp)
    return send.restore_to(where, record, dest, mp)


@hookimpl
def snapcore_verify(target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
    if export is None:
        return []
    where = _dest(target, export)
    record = send.read_record(send.record_path(where, target.checkpoint_id))
    if record is None:
        return [f"the export record {send.record_path(where, target.checkpoint_id)} is missing"]
    return send.verify(where, record)
