"""Retention: apply each mount's ``keep`` (``snapcore prune``), generic across backends;
and the removal of one checkpoint on demand (``snapcore delete``).

Per mount, the images are put newest first: those the manifests under
``STATE/checkpoints`` record as good, and those the imager's
``snapcore_list_images`` finds that no manifest records (orphans, e.g. a manifest
deleted by hand). The ``keep`` of the mount's newest manifest decides:

* the newest successful image is always kept, whatever the rule says;
* ``last: N`` keeps the N newest successful images;
* ``within: D`` keeps every image made less than D ago;
* with both, an image is kept when either rule keeps it. Orphans never count
  toward ``last``. A mount whose newest manifest has no ``keep`` is left alone.

What a target keeps is its image, or, with an imager that keeps none (fsfreeze: the
exporter copied the frozen live tree), its export. They are removed through the
backends' ``snapcore_discard`` (the export first, then the image), newest first; an
export a backend refuses because later ones build on it
(:class:`~snapcore.errors.StillNeeded`, an incremental chain's base) is kept, and
said so. A manifest whose every image is gone is removed with its directory; one
that still holds an image of another mount is rewritten with the pruned target
marked ``outcome: pruned``. Manifests of failed checkpoints hold no image and are
left alone.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from snapcore.errors import LockBusy, StillNeeded, UsageError
from snapcore.host.locks import MountLock, default_run_dir
from snapcore.host.mounts import MountTable
from snapcore.plugins import Plugins
from snapcore.store.export_files import remove_put
from snapcore.store.manifest import Manifest, TargetRecord, iter_manifests, load, utc_now
from snapcore.store.records import export_of, image_of, mount_of, target_of
from snapcore.types import Consistency, Export, Image, ImageEntry, Keep, Outcome, Target

log = logging.getLogger(__name__)

PRUNED = "pruned"
DELETED = "deleted"
#: A record's extra field: when its export was removed (its image may remain).
EXPORT_REMOVED = "export_removed"


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass(slots=True, kw_only=True)
class Entry:
    """One image of a mount, from a manifest or found by the imager."""

    mount: str
    imager: str
    checkpoint_id: str | None
    ref: str | None
    created: float
    manifest: Manifest | None = None
    record: TargetRecord | None = None
    listed: ImageEntry | None = None
    keep: bool = False
    why: str = ""

    @property
    def orphan(self) -> bool:
        return self.manifest is None


@dataclass(slots=True, kw_only=True)
class MountPlan:
    mount: str
    keep: Keep | None
    entries: list[Entry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def to_remove(self) -> list[Entry]:
        if self.keep is None:  # no rule: nothing of this mount is ever removed
            return []
        return [e for e in self.entries if not e.keep]


@dataclass(slots=True, kw_only=True)
class PruneReport:
    plans: list[MountPlan]
    removed: list[Entry] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    manifests_removed: list[str] = field(default_factory=list)


def decide(entries: list[Entry], keep: Keep, now: float) -> None:
    """Mark each entry keep or not (newest first), with the reason."""
    entries.sort(key=lambda e: e.created, reverse=True)
    good = 0
    newest_done = False
    for entry in entries:
        reasons = []
        if not entry.orphan and not newest_done:
            newest_done = True
            reasons.append("newest successful image")
        if not entry.orphan:
            good += 1
            if keep.last is not None and good <= keep.last:
                reasons.append(f"among the last {keep.last}")
        if keep.within is not None and now - entry.created < keep.within:
            reasons.append(f"made within {keep.within:g}s")
        entry.keep = bool(reasons)
        if entry.keep:
            entry.why = ", ".join(reasons)
        else:
            entry.why = "image without a manifest (orphan)" if entry.orphan else "outside the keep rule"


def _kept(record: TargetRecord) -> tuple[Image | None, Export | None]:
    """What a target keeps on disk: its image (one with a ref) and its export."""
    image, export = image_of(record), export_of(record)
    return (
        image if image is not None and image.ref is not None else None,
        export if export is not None and record.exporter else None,
    )


def _kept_ref(record: TargetRecord) -> str | None:
    """The image a target keeps, or its export when the imager keeps none."""
    image, export = _kept(record)
    if image is not None:
        return image.ref
    return (export.path or export.ref) if export is not None else None


def plan(
    state_dir: Path, plugins: Plugins, *, now: float | None = None, table: MountTable | None = None
) -> list[MountPlan]:
    """What ``prune`` would remove, per mount; touches nothing."""
    now = time.time() if now is None else now
    table = table or MountTable.read()
    manifests = [m for _, m, _ in iter_manifests(state_dir) if m is not None]  # newest first
    plans: dict[str, MountPlan] = {}
    # what the manifests know, so that only images no manifest mentions are orphans
    refs: set[str] = set()
    known: set[tuple[str, str]] = set()
    newest: dict[str, tuple[Manifest, TargetRecord]] = {}
    for manifest in manifests:
        for record in manifest.targets:
            known.add((manifest.id, record.mount))
            if record.image:
                refs.add(record.image)
            if record.imager is None:
                continue
            newest.setdefault(record.mount, (manifest, record))
            if record.mount not in plans:
                keep = None
                if record.keep:
                    keep = Keep(last=record.keep.get("last"), within=record.keep.get("within"))
                plans[record.mount] = MountPlan(mount=record.mount, keep=keep)
            if record.outcome != Outcome.OK.value or not record.image_record:
                continue
            ref = _kept_ref(record)
            if ref is None:
                continue  # nothing kept (fsfreeze or none without an exporter): nothing to prune
            plans[record.mount].entries.append(
                Entry(
                    mount=record.mount,
                    imager=record.imager,
                    checkpoint_id=manifest.id,
                    ref=ref,
                    created=_epoch(manifest.started),
                    manifest=manifest,
                    record=record,
                )
            )
    for mount_point, mount_plan in plans.items():
        if mount_plan.keep is None:
            continue
        _, record = newest[mount_point]
        assert record.imager is not None
        mount = mount_of(record, table)
        if mount.mount_id >= 0:
            try:
                listed = plugins.list_images(record.imager, mount)
            except Exception as exc:
                mount_plan.warnings.append(f"{record.imager} could not list the images of {mount_point}: {exc}")
                listed = []
            for item in listed:
                if item.ref not in refs and (item.checkpoint_id or "", mount_point) not in known:
                    mount_plan.entries.append(
                        Entry(
                            mount=mount_point,
                            imager=record.imager,
                            checkpoint_id=item.checkpoint_id,
                            ref=item.ref,
                            created=item.created or 0.0,
                            listed=item,
                        )
                    )
        decide(mount_plan.entries, mount_plan.keep, now)
    return sorted(plans.values(), key=lambda p: p.mount)


def _target_for(entry: Entry, state_dir: Path, table: MountTable, newest: TargetRecord | None) -> Target:
    if entry.manifest is not None and entry.record is not None:
        return target_of(entry.manifest, entry.record, state_dir, table)
    from types import MappingProxyType

    record = newest
    options = {k: MappingProxyType(dict(v)) for k, v in ((record.options if record else None) or {}).items()}
    mount = mount_of(record, table) if record else None
    assert mount is not None
    return Target(
        checkpoint_id=entry.checkpoint_id or "orphan",
        mount=mount,
        imager=entry.imager,
        options=MappingProxyType(options),
        state_dir=state_dir,
    )


@contextlib.contextmanager
def _holding(run_dir: Path | None, mount: str, who: str) -> Iterator[None]:
    """The mount's checkpoint lock while its images go: a checkpoint running on it
    may be building on one of them (an incremental send against its parent)."""
    lock = MountLock(run_dir or default_run_dir(), mount, who)
    lock.acquire()  # LockBusy: a checkpoint (or another prune or delete) holds it
    try:
        yield
    finally:
        lock.release()


def prune(
    state_dir: Path,
    plugins: Plugins,
    *,
    dry_run: bool = False,
    now: float | None = None,
    table: MountTable | None = None,
    run_dir: Path | None = None,
) -> PruneReport:
    """Apply every mount's ``keep``; with ``dry_run``, only say what would go. Each
    mount is pruned holding its checkpoint lock (in ``run_dir``); a busy one is an
    error, left for the next run."""
    table = table or MountTable.read()
    plans = plan(state_dir, plugins, now=now, table=table)
    report = PruneReport(plans=plans)
    if dry_run:
        return report
    touched: dict[str, Manifest] = {}
    for mount_plan in plans:
        if not mount_plan.to_remove:
            continue
        try:
            with _holding(run_dir, mount_plan.mount, "prune"):
                _prune_mount(mount_plan, state_dir, table, plugins, report, touched)
        except LockBusy as exc:
            report.errors.append(f"{mount_plan.mount}: not pruned: {exc}")
    for manifest in touched.values():
        if any(t.outcome == Outcome.OK.value for t in manifest.targets):
            manifest.write(state_dir)
        else:
            shutil.rmtree(state_dir / "checkpoints" / manifest.id, ignore_errors=True)
            report.manifests_removed.append(manifest.id)
    return report


def _prune_mount(
    mount_plan: MountPlan,
    state_dir: Path,
    table: MountTable,
    plugins: Plugins,
    report: PruneReport,
    touched: dict[str, Manifest],
) -> None:
    newest_record = next((e.record for e in mount_plan.entries if e.record is not None), None)
    for entry in mount_plan.to_remove:
        try:
            _remove(entry, state_dir, table, plugins, newest_record)
        except StillNeeded as exc:
            entry.keep, entry.why = True, f"still needed: {exc}"
            continue
        except Exception as exc:
            report.errors.append(f"{entry.mount}: cannot remove {entry.ref}: {exc}")
            if entry.manifest is not None and entry.record is not None and EXPORT_REMOVED in entry.record.extra:
                touched[entry.manifest.id] = entry.manifest  # its export went before the error
            continue
        report.removed.append(entry)
        if entry.manifest is not None and entry.record is not None:
            entry.record.outcome = PRUNED
            entry.record.extra["pruned"] = utc_now()
            touched[entry.manifest.id] = entry.manifest


def _remove(entry: Entry, state_dir: Path, table: MountTable, plugins: Plugins, newest: TargetRecord | None) -> None:
    target = _target_for(entry, state_dir, table, newest)
    if entry.record is not None:
        record = entry.record
        export = export_of(record)
        if export is not None and record.exporter:
            plugins.discard(record.exporter, target, image_of(record), export)
            # what the core put beside the exporter's files (--send-images): its discard does not know it
            remove_put(export, target.checkpoint_id)
            # gone, whatever happens to the image next: the manifest must not offer it
            record.export, record.export_record = None, None
            record.extra[EXPORT_REMOVED] = utc_now()
        plugins.discard(entry.imager, target, image_of(record), None)
        return
    assert entry.ref is not None
    image = Image(backend=entry.imager, ref=entry.ref, consistency=Consistency.ATOMIC, path=entry.ref)
    plugins.discard(entry.imager, target, image, None)


@dataclass(slots=True, kw_only=True)
class Deletion:
    """What ``delete`` did (or, dry, would do) to one checkpoint."""

    manifest: Manifest
    #: ``(mount, what)``: the image and export of each target removed.
    removed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    manifest_removed: bool = False


def _holds(record: TargetRecord) -> str | None:
    """What a target still keeps on disk, in words; None when nothing."""
    if record.outcome != Outcome.OK.value:
        return None  # failed (its images were discarded then), pruned or deleted
    image, export = _kept(record)
    parts = []
    if image is not None:
        parts.append(f"image {image.ref}")
    if export is not None:
        parts.append(f"{record.exporter} export {export.path or export.ref}")
    return ", ".join(parts) or None


def delete(
    state_dir: Path,
    plugins: Plugins,
    checkpoint_ids: Sequence[str],
    *,
    mounts: Sequence[str] = (),
    dry_run: bool = False,
    table: MountTable | None = None,
    run_dir: Path | None = None,
) -> list[Deletion]:
    """Remove checkpoints (or, with ``mounts``, only those mounts' part of them) the way
    ``snapper delete`` or ``lvremove`` would: each export, then each image, through
    their backends, which refuse what snapcore did not make and what later increments
    still build on. A manifest is removed once nothing of it is left, else rewritten
    with the removed targets marked ``outcome: deleted``. Every id is looked up
    before anything is removed: an unknown one removes nothing. A mount's images go
    holding its checkpoint lock (in ``run_dir``): a busy mount is an error."""
    manifests = [load(state_dir, checkpoint_id) for checkpoint_id in dict.fromkeys(checkpoint_ids)]
    for mount in mounts:
        for manifest in manifests:
            if not any(t.mount == mount for t in manifest.targets):
                raise UsageError(f"checkpoint {manifest.id} has no target {mount}")
    table = table or MountTable.read()
    done = []
    for manifest in manifests:
        deletion = Deletion(manifest=manifest)
        done.append(deletion)
        changed = False
        for record in manifest.targets:
            if mounts and record.mount not in mounts:
                continue
            what = _holds(record)
            if what is None:
                continue
            if not dry_run:
                assert record.imager is not None
                entry = Entry(
                    mount=record.mount,
                    imager=record.imager,
                    checkpoint_id=manifest.id,
                    ref=record.image,
                    created=_epoch(manifest.started),
                    manifest=manifest,
                    record=record,
                )
                try:
                    with _holding(run_dir, record.mount, f"delete {manifest.id}"):
                        _remove(entry, state_dir, table, plugins, None)
                except Exception as exc:  # LockBusy too: a checkpoint of that mount runs
                    deletion.errors.append(f"{record.mount}: cannot remove {what}: {exc}")
                    changed = changed or EXPORT_REMOVED in record.extra  # its export went before the error
                    continue
                record.outcome = DELETED
                record.extra["deleted"] = utc_now()
            deletion.removed.append((record.mount, what))
        going = {mount for mount, _ in deletion.removed} if dry_run else set()
        left = [t for t in manifest.targets if _holds(t) is not None and t.mount not in going]
        # with ``mounts``, a manifest goes only when this call removes its last image
        if not left and not deletion.errors and (not mounts or deletion.removed):
            if not dry_run:
                shutil.rmtree(state_dir / "checkpoints" / manifest.id, ignore_errors=True)
            deletion.manifest_removed = True
        elif (deletion.removed or changed) and not dry_run:
            manifest.write(state_dir)
    return done


def describe(report: PruneReport, dry_run: bool) -> Sequence[str]:
    """Lines for people: per mount, every image with keep/remove and why."""
    lines: list[str] = []
    verb = "would remove" if dry_run else "remove"
    for mount_plan in report.plans:
        if mount_plan.keep is None:
            lines.append(f"{mount_plan.mount}: no keep rule, left alone")
            continue
        rule = ", ".join(
            f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}"
            for k, v in (("last", mount_plan.keep.last), ("within", mount_plan.keep.within))
            if v is not None
        )
        lines.append(f"{mount_plan.mount}: keep {{{rule}}}")
        for e in mount_plan.entries:
            what = "keep  " if e.keep else verb
            why = e.why
            if dry_run and not e.keep and e.record is not None and e.record.export_record:
                why += "; unless later exports build on it"  # only its backend knows: asked when removing
            lines.append(f"  {what} {e.checkpoint_id or '-'} {e.ref} ({why})")
        lines.extend(f"  warning: {w}" for w in mount_plan.warnings)
    lines.extend(f"removed manifest {m}" for m in report.manifests_removed)
    lines.extend(f"error: {e}" for e in report.errors)
    return lines
