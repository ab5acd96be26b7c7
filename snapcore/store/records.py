"""Targets, images and exports rebuilt from a manifest (for restore, verify, prune)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from snapcore.errors import SnapcoreError
from snapcore.host.mounts import MountTable
from snapcore.store.manifest import Manifest, TargetRecord
from snapcore.types import Export, Image, Keep, Mount, Target


def mount_of(record: TargetRecord, table: MountTable | None) -> Mount:
    """The live mount at the recorded mount point when it is the same filesystem,
    else a stand-in built from the record (the mount may be gone)."""
    if table is not None:
        for mount in reversed(table.mounts):
            if mount.mount_point == record.mount and mount.fstype == record.fstype:
                return table.enrich(mount)
    return Mount(
        mount_id=-1,
        parent_id=-1,
        major=0,
        minor=0,
        root="/",
        mount_point=record.mount,
        mount_options=(),
        fstype=record.fstype,
        source=record.source,
        super_options=(),
        devnode=record.device,
    )


def target_of(manifest: Manifest, record: TargetRecord, state_dir: Path, table: MountTable | None) -> Target:
    keep = None
    if record.keep:
        keep = Keep(last=record.keep.get("last"), within=record.keep.get("within"))
    return Target(
        checkpoint_id=manifest.id,
        mount=mount_of(record, table),
        imager=record.imager or "none",
        exporter=record.exporter,
        options=MappingProxyType({k: MappingProxyType(dict(v)) for k, v in (record.options or {}).items()}),
        keep=keep,
        state_dir=state_dir,
    )


def image_of(record: TargetRecord) -> Image | None:
    """The record's image, or ``SnapcoreError`` when the record cannot be one (a
    manifest is untrusted input)."""
    try:
        return Image.from_json(record.image_record) if record.image_record else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapcoreError(f"{record.mount}: unreadable image record: {exc!r}") from None


def export_of(record: TargetRecord) -> Export | None:
    """The record's export, or ``SnapcoreError`` (as :func:`image_of`)."""
    try:
        return Export.from_json(record.export_record) if record.export_record else None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapcoreError(f"{record.mount}: unreadable export record: {exc!r}") from None
