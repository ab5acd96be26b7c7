"""Restore and verify a checkpoint's images and exports (what ``snapcore restore`` and
``snapcore verify`` do; :mod:`snapcore.api` is their public face)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapcore.errors import SnapcoreError, UsageError
from snapcore.host.mounts import MountTable
from snapcore.plugins import Plugins
from snapcore.store.confine import beneath, clean_mount
from snapcore.store.manifest import (
    MANIFEST_NAME,
    Manifest,
    TargetRecord,
    check_checkpoint_id,
    load,
    read_manifest,
    utc_now,
)
from snapcore.store.records import export_of, image_of, target_of
from snapcore.types import Export, Restored

#: How long a restore before ``criu restore`` waits for the checkpointed PIDs to be free.
PIDS_FREE_S = 5.0


@dataclass(frozen=True, slots=True)
class MountRestored:
    """One mount put back by :func:`restore`."""

    mount: str
    #: What the backend did, in words ("rolled back in place", "extracted 3 archives into DIR").
    message: str
    #: With ``in_place``, the checkpoint id of the state the restore replaced (a btrfs
    #: rollback keeps it as an image of its own), else None.
    set_aside_id: str | None = None


@dataclass(frozen=True, slots=True)
class Verification:
    """What :func:`verify` found: per mount, its problems (none: intact)."""

    checkpoint_id: str
    mounts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.mounts.values())

    @property
    def problems(self) -> list[str]:
        """Every problem, prefixed with its mount."""
        return [f"{mount}: {p}" for mount, found in self.mounts.items() for p in found]


def records_of(
    state_dir: Path, checkpoint_id: str | None, from_dir: Path | None, mount: str | None = None
) -> tuple[Manifest, list[TargetRecord]]:
    """The checkpoint's manifest (from ``state_dir``, or the copy an export directory
    carries) and its good targets, optionally only ``mount``'s. A manifest copy from
    elsewhere is untrusted: every target's mount must be a clean absolute path, once."""
    if (checkpoint_id is None) == (from_dir is None):
        raise UsageError("give a checkpoint ID or --from EXPORT_DIR, not both or neither")
    if from_dir is not None:
        # an export carries a copy of its manifest: restore on a host that never saw the checkpoint
        manifest = read_manifest(from_dir / MANIFEST_NAME)
        records = [t for t in manifest.targets if t.outcome == "ok" and t.export_record]
    else:
        assert checkpoint_id is not None
        manifest = load(state_dir, checkpoint_id)
        records = [t for t in manifest.targets if t.outcome == "ok"]
    if mount:
        records = [t for t in records if t.mount == os.path.normpath(mount)]
        if not records:
            raise UsageError(f"checkpoint {manifest.id} has no good image of {mount}")
    if not records:
        raise SnapcoreError(f"checkpoint {manifest.id} has no good image to use (outcome {manifest.outcome})")
    seen: set[str] = set()
    for record in records:
        clean = clean_mount(record.mount, where=f"checkpoint {manifest.id}: a target's mount")
        if clean in seen:
            raise SnapcoreError(f"checkpoint {manifest.id}: two targets claim the mount {clean!r}: refusing")
        seen.add(clean)
    return manifest, records


def _moved(export: Export | None, from_dir: Path | None) -> Export | None:
    """With ``from_dir``, the export is wherever its directory is now: ``Export.path``
    names the directory that holds the manifest copy (the exporters' contract)."""
    if export is None or from_dir is None:
        return export
    return dataclasses.replace(export, path=os.path.abspath(from_dir))


def restore(
    plugins: Plugins,
    state_dir: Path,
    *,
    checkpoint_id: str | None = None,
    from_dir: Path | None = None,
    mount: str | None = None,
    to: Path | None = None,
    in_place: bool = False,
    safe: bool = False,
    before_criu_restore: bool = False,
    table: MountTable | None = None,
    on_restored: Callable[[MountRestored], None] | None = None,
) -> list[MountRestored]:
    """Put the checkpoint's images (or its exports) back, mount by mount, ``to`` a new
    directory or ``in_place``. ``on_restored`` is told of each mount as it is done; a
    failure after some are done says which."""
    if to is None and not in_place:
        raise UsageError("say where to restore: a directory (--to DIR) or in place (--in-place)")
    if to is not None and in_place:
        raise UsageError("restore to a directory (--to DIR) or in place (--in-place), not both")
    if safe and to is None:
        raise UsageError("--safe restores a copy: use it with --to DIR")
    manifest, records = records_of(state_dir, checkpoint_id, from_dir, mount)
    if before_criu_restore:
        check_pids_free(manifest)
    table = table or MountTable.read()
    done: list[MountRestored] = []
    for record in records:
        target = target_of(manifest, record, state_dir, table)
        image, export = image_of(record), _moved(export_of(record), from_dir)
        backend = record.exporter if export is not None and record.exporter else record.imager
        if backend is None:
            raise SnapcoreError(f"{record.mount}: nothing to restore from")
        dest = None
        if to is not None:
            dest = beneath(to, record.mount) if len(records) > 1 else to
        try:
            if safe and dest is not None:
                from snapcore.store.defuse import staged

                with staged(dest) as staging:
                    restored = plugins.restore(backend, target, image, export, staging.tree, False)
                message = restored.message.replace(str(staging.tree), str(dest))
                message += f"; {staging.defused.summary()}"
            else:
                restored = plugins.restore(backend, target, image, export, dest, in_place)
                message = restored.message
        except SnapcoreError as exc:
            if done:
                raise SnapcoreError(f"{exc} (already restored: {', '.join(d.mount for d in done)})") from exc
            raise
        kept = None
        if restored.set_aside is not None and restored.set_aside_id:
            kept = _record_set_aside(manifest, record, restored, state_dir)
        one = MountRestored(record.mount, message, kept)
        done.append(one)
        if on_restored is not None:
            on_restored(one)
    return done


def check_pids_free(manifest: Manifest) -> None:
    """``criu restore`` gives the tasks back their PIDs, and fails ("File exists") when
    one is taken: say so before any filesystem is rolled back, not after."""
    from snapcore.tasks.resolve import wait_pids_free

    pids = (manifest.tasks or {}).get("pids") if isinstance(manifest.tasks, dict) else None
    wanted = [p for p in pids or () if isinstance(p, int) and not isinstance(p, bool) and 0 < p < 1 << 22]
    held = wait_pids_free(wanted, PIDS_FREE_S, ending=False)
    if held:
        raise SnapcoreError(
            f"cannot restore checkpoint {manifest.id}: CRIU gives the tasks back their PIDs, and "
            f"{', '.join(str(h) for h in held)} holds one; end it (or wait for it to be reaped), then "
            "restore again (nothing was changed)"
        )


def _record_set_aside(manifest: Manifest, record: TargetRecord, restored: Restored, state_dir: Path) -> str:
    """A manifest for the state an in-place restore replaced (a btrfs rollback's
    previous subvolume): ``list``, ``show``, ``restore``, ``prune`` and ``delete`` see
    it like any checkpoint, and two restores never share a name."""
    image = restored.set_aside
    assert image is not None and restored.set_aside_id is not None
    now = utc_now()
    kept = Manifest(
        id=check_checkpoint_id(restored.set_aside_id),
        outcome="ok",
        started=now,
        finished=now,
        targets=[
            TargetRecord(
                mount=record.mount,
                source=record.source,
                fstype=record.fstype,
                imager=image.backend,
                exporter=None,
                image=image.ref,
                consistency=image.consistency.value,
                outcome="ok",
                image_record=image.to_json(),
                device=record.device,
                options=record.options,
                keep=record.keep,
                warnings=[f"the state of {record.mount} that restoring checkpoint {manifest.id} replaced"],
            )
        ],
        extra={"set_aside_by_restore_of": manifest.id},
    )
    kept.write(state_dir)
    return kept.id


def verify(
    plugins: Plugins,
    state_dir: Path,
    *,
    checkpoint_id: str | None = None,
    from_dir: Path | None = None,
    table: MountTable | None = None,
) -> Verification:
    """Ask each target's imager and exporter whether what they keep is still there and
    intact (with ``from_dir``: the exports in that directory alone)."""
    manifest, records = records_of(state_dir, checkpoint_id, from_dir)
    table = table or MountTable.read()
    found: dict[str, list[str]] = {}
    for record in records:
        target = target_of(manifest, record, state_dir, table)
        image, export = image_of(record), _moved(export_of(record), from_dir)
        problems: list[str] = []
        if record.imager and image is not None and image.ref is not None and from_dir is None:
            problems += plugins.verify(record.imager, target, image, None)
        if record.exporter and export is not None:
            problems += plugins.verify(record.exporter, target, image, export)
        found[record.mount] = problems
    return Verification(manifest.id, found)


__all__: Sequence[str] = ["MountRestored", "Verification", "restore", "verify", "records_of", "check_pids_free"]
