"""The marker file that makes a snapshot snapcore's, and recognising it.

Layout of a snapshot directory (default ``<mount>/.snapshots``)::

    <snapshot_dir>/<checkpoint id>                 read-only snapshot of the mounted subvolume
    <snapshot_dir>/<checkpoint id>.snapcore.json   marker: who made it, of what, its uuid

A subvolume counts as snapcore's only when its marker sits next to it, names it,
and records its own uuid: a subvolume someone else put there (or a new one under an
old name) never matches, so it is never deleted. Snapshotting and rollback write
markers; discarding, listing, verifying and restoring read them: one module for
the format so that they cannot drift apart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import btrfsutil

MARKER_SUFFIX = ".snapcore.json"
MARKER_VERSION = 1


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


def write_marker(snapshot: Path, marker: Marker) -> None:
    # no fsync: the snapshot is already committed, and a marker lost in a crash only
    # makes the snapshot unrecognised, i.e. kept forever, never wrongly deleted
    fd = os.open(marker_path(snapshot), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(marker.to_json()).encode())
    finally:
        os.close(fd)
