"""What a checkpoint makes of each target (DESIGN steps 6, 7 and 10): its image, its
export, their completion by the backends, and their removal when it fails."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from snapcore.store.export_files import remove_put
from snapcore.transaction.targets import TargetRun, describe
from snapcore.types import Consistency, Outcome, Phase

if TYPE_CHECKING:
    from snapcore.transaction.core import Transaction


def snapshot_all(txn: Transaction) -> None:
    """Image every target (in parallel per level's pool). Intents before, images after,
    one journal write each: a crash in between is cleaned up by listing the backend's
    images of this checkpoint id."""
    txn.journal.record_many([{"op": "snapshot", "key": r.mount_point} for r in txn.active])
    try:
        txn.each(txn.active, Phase.SNAPSHOT, lambda run: _snapshot_one(txn, run))
    finally:
        made = [r for r in txn.runs if r.image is not None]
        txn.journal.record_many(
            [{"op": "image", "key": r.mount_point, "image": r.image.to_json()} for r in made if r.image]
        )


def _snapshot_one(txn: Transaction, run: TargetRun) -> None:
    t = time.perf_counter()
    run.image = txn.plugins.snapshot(run.target.imager, run.target)
    run.time(Phase.SNAPSHOT, t)


def export_all(txn: Transaction, runs: list[TargetRun]) -> None:
    """Copy each run's image with its exporter (skipping those exported already)."""
    txn.each([r for r in runs if r.export is None], Phase.EXPORT, lambda run: _export_one(txn, run))


def export_dest(run: TargetRun) -> Path:
    """Where the run's exporter writes: its ``dest`` option, else the checkpoint's own."""
    exporter = run.target.exporter
    assert exporter is not None
    dest = run.target.options_for(exporter).get("dest")
    return Path(dest) if dest else run.target.checkpoint_dir / "exports" / exporter


def precopy_all(txn: Transaction) -> None:
    """Before any freeze: each exporter asked to copy ahead (a true ``precopy`` in its
    options) copies the live mount now; the rounds go into the target's record."""

    def one(run: TargetRun) -> None:
        exporter = run.target.exporter
        assert exporter is not None
        t = time.perf_counter()
        dest_path = export_dest(run)
        # as for an export: a controller killed now leaves this intent, and 'recover'
        # has the exporter remove what it wrote
        txn.journal.record("export", key=run.mount_point, exporter=exporter, dest=str(dest_path))
        run.precopied = True
        try:
            rounds = txn.plugins.precopy(exporter, run.target, dest_path)
        except BaseException:
            discard_precopy(txn, run)
            raise
        if rounds:
            run.record.precopy = rounds
        run.time(Phase.PRECOPY, t)

    runs = [
        r
        for r in txn.active
        if r.target.exporter
        and r.target.options_for(r.target.exporter).get("precopy")
        and txn.plugins.implements(r.target.exporter, "snapcore_precopy")
    ]
    if runs:
        txn.each(runs, Phase.PRECOPY, one)


def discard_precopy(txn: Transaction, run: TargetRun) -> None:
    """What a pre-copy wrote for a run that never got its export (a failure between)."""
    exporter = run.target.exporter
    if not run.precopied or run.export is not None or exporter is None:
        return
    run.precopied = False
    try:
        done = txn.plugins.discard_partial(exporter, run.target, export_dest(run))
    except Exception as exc:
        run.record.warnings.append(f"removing what the pre-copy wrote failed: {describe(exc)}")
        return
    txn.journal.record("export-discarded", key=run.mount_point)
    run.record.warnings.extend(done)


def _export_one(txn: Transaction, run: TargetRun) -> None:
    exporter = run.target.exporter
    if exporter is None or run.image is None:
        return
    t = time.perf_counter()
    dest_path = export_dest(run)
    # a controller killed during the export leaves this intent: 'recover' asks the
    # exporter to remove what it half wrote (discard_partial)
    txn.journal.record("export", key=run.mount_point, exporter=exporter, dest=str(dest_path))
    run.export = txn.plugins.export(exporter, run.target, run.image, dest_path)
    txn.journal.record("exported", key=run.mount_point, export=run.export.to_json())
    run.time(Phase.EXPORT, t)


def finish(txn: Transaction, run: TargetRun) -> None:
    """Let the backends complete what they made, before the manifest says ok."""
    try:
        if run.image is not None:
            run.record.warnings += txn.plugins.finish(run.target.imager, run.target, run.image, None)
        if run.export is not None and run.target.exporter:
            run.record.warnings += txn.plugins.finish(run.target.exporter, run.target, run.image, run.export)
    except Exception as exc:
        run.record.error = f"{Phase.FINISH.value}: {describe(exc)}"
        raise


def record(run: TargetRun, *, tasks_stopped: bool) -> None:
    """Write what was made into the target's manifest record: outcome ok."""
    rec = run.record
    image = run.image
    if image is not None:
        if image.live and run.export is None:
            # the frozen live tree was the image and nobody copied it
            rec.consistency = Consistency.QUIESCED.value
            rec.warnings.append(
                f"{run.target.imager} keeps no image without an exporter: the filesystem was synced "
                "and frozen at the checkpoint instant, nothing more"
            )
        else:
            rec.consistency = image.consistency.value
            if image.consistency is Consistency.CRASH_CONSISTENT and tasks_stopped:
                # nothing the checkpointed tasks wrote raced the snapshot
                rec.consistency = Consistency.TASKS_FROZEN.value
            rec.image = image.ref
        rec.image_record = image.to_json()
        # a backend's warnings about its image (e.g. btrfs: nested subvolumes left out)
        rec.warnings.extend(str(w) for w in image.details.get("warnings") or ())
    if run.export is not None:
        rec.export = run.export.ref
        rec.export_record = run.export.to_json()
        rec.warnings.extend(str(w) for w in run.export.details.get("warnings") or ())
    rec.outcome = Outcome.OK.value


def discard(txn: Transaction, run: TargetRun) -> None:
    """Remove the run's export, then its image, through their backends (a failed
    checkpoint keeps nothing half-made); a failure to is a warning in its record."""
    discard_precopy(txn, run)
    if run.export is not None and run.target.exporter:
        remove_put(run.export, txn.id)
        try:
            txn.plugins.discard(run.target.exporter, run.target, run.image, run.export)
        except Exception as exc:
            run.record.warnings.append(f"discarding the export failed: {describe(exc)}")
        else:
            txn.journal.record("export-discarded", key=run.mount_point)
        run.export = None
    if run.image is not None:
        try:
            txn.plugins.discard(run.target.imager, run.target, run.image, None)
        except Exception as exc:
            run.record.warnings.append(f"discarding the image failed: {describe(exc)}")
        else:
            txn.journal.record("discarded", key=run.mount_point)
        run.image = None
