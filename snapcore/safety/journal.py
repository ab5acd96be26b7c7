"""The crash journal and ``snapcore recover``.

Before each freeze, each image and each export, the controller appends an intent
record to ``RUN/journal/ID.jsonl`` and flushes it; the file goes away when the
checkpoint ends. A journal whose owner is dead therefore says exactly what may still
be frozen, which images may be half-made and which exports half-written.
``recover`` (run by ``snapcore recover`` and at the start of every checkpoint) thaws
the first (only targets this checkpoint froze and never recorded as thawed),
discards the others (a finished export whole, an unfinished one through the
exporter's ``discard_partial``), marks the checkpoint failed in its manifest, and
removes the journal. Running it twice is harmless.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore.errors import SnapcoreError
from snapcore.host.fsutil import process_start_time
from snapcore.safety import guard as guard
from snapcore.store.manifest import Manifest, TargetRecord, drop_ghosts, load, manifest_path, utc_now
from snapcore.types import Consistency, Export, Image, Rescue, RescueKind, Target

if TYPE_CHECKING:
    from snapcore.plugins import Plugins


def secure_dir(path: Path) -> Path:
    """Create ``path`` 0700 if needed (see :func:`snapcore.host.fsutil.secure_dir`)."""
    from snapcore.host.fsutil import secure_dir as check

    check(path)
    return path


class Journal:
    """Intent records of one checkpoint, appended and flushed one by one."""

    def __init__(self, run_dir: Path, checkpoint_id: str) -> None:
        self.dir = run_dir / "journal"
        self.path = self.dir / f"{checkpoint_id}.jsonl"
        self.guard_record = self.dir / f"{checkpoint_id}.guard.jsonl"
        self.checkpoint_id = checkpoint_id
        self.fd: int | None = None

    def open(self, **header: Any) -> None:
        secure_dir(self.dir)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o600)
        pid = os.getpid()
        self.record("begin", id=self.checkpoint_id, pid=pid, pid_start=process_start_time(pid), **header)

    def record(self, op: str, **fields: Any) -> None:
        """Append one record. No fsync: the journal guards against the controller's
        death, which a write survives; a machine crash thaws every filesystem by
        itself (and ``/run`` is a tmpfs on a normal host). Records are written from
        inside the freeze window, where an fsync could cost milliseconds."""
        self.record_many([{"op": op, **fields}])

    def record_many(self, records: list[dict[str, Any]]) -> None:
        """Append several records in one write."""
        if self.fd is None or not records:
            return
        os.write(self.fd, "".join(json.dumps(r) + "\n" for r in records).encode())

    def detach(self) -> None:
        """Stop writing but leave the journal for ``recover`` (no manifest was written)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self, outcome: str) -> None:
        """The checkpoint is over and its manifest written: nothing to recover."""
        if self.fd is None:
            return
        self.record("end", outcome=outcome)
        os.close(self.fd)
        self.fd = None
        for path in (self.path, self.guard_record):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass(slots=True)
class Pending:
    """What a dead controller's journal says."""

    path: Path
    checkpoint_id: str
    pid: int | None
    state_dir: Path | None
    started: str | None
    frozen: dict[str, dict[str, Any]] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshotting: set[str] = field(default_factory=set)
    #: Exports begun (the intent: exporter and dest) and those that returned.
    exporting: dict[str, dict[str, Any]] = field(default_factory=dict)
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    guard: list[dict[str, Any]] = field(default_factory=list)
    ended: str | None = None
    #: The checkpoint was complete and its tasks held for a hand-off when it died.
    handoff: bool = False
    #: The name of the temporary freezer cgroups the tasks were moved into.
    tasks: str | None = None


def _alive(pid: int | None, start: str | None) -> bool:
    if pid is None:
        return False
    current = process_start_time(pid)
    return current is not None and (start is None or current == start)


#: A journal holds a few records per target: anything bigger was not written by us.
MAX_JOURNAL_BYTES = 64 << 20


def _lines(path: Path) -> list[str]:
    """A journal's lines, read as :func:`~snapcore.host.fsutil.read_regular` reads a
    manifest: a regular file of root's that nobody else can write, size-capped."""
    from snapcore.host.fsutil import read_regular

    return read_regular(path, MAX_JOURNAL_BYTES, owned=True).decode("utf-8", "replace").splitlines()


def read_journal(path: Path) -> tuple[Pending, bool]:
    """Parse one journal; the flag says whether its owner is still running."""
    pending = Pending(path=path, checkpoint_id=path.name[: -len(".jsonl")], pid=None, state_dir=None, started=None)
    alive = False
    for line in _lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line: the controller died while writing it
        if not isinstance(rec, dict):
            continue
        op, key = rec.get("op"), rec.get("key")
        if not isinstance(key, str):
            key = ""
        if op == "begin":
            pending.pid = rec.get("pid")
            pending.state_dir = Path(rec["state_dir"]) if rec.get("state_dir") else None
            pending.started = rec.get("started")
            alive = _alive(pending.pid, rec.get("pid_start"))
        elif op == "target":
            pending.targets[key] = rec
        elif op == "freeze":
            pending.frozen[key] = rec
        elif op == "thawed":
            pending.frozen.pop(key, None)
        elif op == "snapshot":
            pending.snapshotting.add(key)
        elif op == "image":
            pending.images[key] = rec["image"]
        elif op == "discarded":
            pending.images.pop(key, None)
            pending.snapshotting.discard(key)
        elif op == "export":
            pending.exporting[key] = rec
        elif op == "exported":
            pending.exports[key] = rec.get("export") or {}
        elif op == "export-discarded":
            pending.exporting.pop(key, None)
            pending.exports.pop(key, None)
        elif op == "end":
            pending.ended = rec.get("outcome")
        elif op == "handoff":  # complete, its manifest written: the tasks are held for a hand-off
            pending.ended = "ok"
            pending.handoff = True
        elif op == "tasks":
            pending.tasks = rec.get("name")
    guard = path.with_name(path.name[: -len(".jsonl")] + ".guard.jsonl")
    if guard.exists():
        for line in _lines(guard):
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    pending.guard.append(entry)
    return pending, alive


def _thaw(how: Rescue) -> str:
    if how.kind is RescueKind.FITHAW and how.path:
        return "thawed" if guard.thaw_path(how.path) else "was not frozen"
    if how.kind is RescueKind.WRITE and how.path:
        return "thawed" if guard.write_control(how.path, how.value or "") else "already gone"
    if how.kind is RescueKind.COMMAND and how.argv:
        guard.run_command(how.argv)
        return "resumed"
    if how.kind is RescueKind.FANOTIFY:
        return "the opens it held were let go when its holders exited"
    return "nothing to do"


def recover_one(pending: Pending, plugins: Plugins | None) -> list[str]:
    """Thaw, discard and mark failed what ``pending`` left; returns what was done."""
    from snapcore.host.mounts import MountTable
    from snapcore.store.records import target_of

    done: list[str] = []
    for entry in pending.guard:
        if entry.get("thawed"):
            done.append(f"the guard had thawed {', '.join(entry['thawed'])} ({entry.get('reason')})")
    for key, rec in reversed(list(pending.frozen.items())):
        rescue = rec.get("rescue")
        if not rescue:
            continue
        try:
            done.append(f"{key}: {_thaw(Rescue.from_json(rescue))}")
        except Exception as exc:
            done.append(f"{key}: THAW FAILED: {exc}")
    if pending.tasks:
        # the tasks go after the filesystems, as in the transaction
        from snapcore.tasks.freezer import recover_temporary_cgroups

        try:
            for group in recover_temporary_cgroups(name=pending.tasks):
                done.append(f"tasks thawed and moved back from {group}")
        except Exception as exc:
            done.append(f"thawing the tasks failed: {exc}")
    if pending.ended == "ok":
        if pending.handoff:
            done.append(_handoff_abandoned(pending))
        pending.path.unlink(missing_ok=True)
        pending.path.with_name(pending.checkpoint_id + ".guard.jsonl").unlink(missing_ok=True)
        return done
    table = None
    with contextlib.suppress(OSError):
        table = MountTable.read()
    manifest = Manifest(id=pending.checkpoint_id, outcome="failed", started=pending.started or utc_now())
    state_dir = pending.state_dir or Path("/var/lib/snapcore")
    for key in sorted(pending.exporting):
        record = _record_of(key, pending.targets.get(key) or {})
        done += _discard_export(pending, key, plugins, target_of(manifest, record, state_dir, table))
    for key in sorted(pending.snapshotting | set(pending.images)):
        info = pending.targets.get(key) or {}
        record = _record_of(key, info)
        if plugins is None or not record.imager or record.imager not in plugins.backends:
            done.append(f"{key}: cannot discard images: backend {record.imager!r} is not loaded")
            continue
        target = target_of(manifest, record, state_dir, table)
        images = []
        if key in pending.images:
            images.append(Image.from_json(pending.images[key]))
        try:
            for found in plugins.list_images(record.imager, target.mount):
                if found.checkpoint_id == pending.checkpoint_id and all(i.ref != found.ref for i in images):
                    images.append(Image(backend=found.backend, ref=found.ref, consistency=Consistency.CRASH_CONSISTENT))
        except Exception as exc:
            done.append(f"{key}: listing images failed: {exc}")
        for image in images:
            if image.ref is None:
                continue
            try:
                plugins.discard(record.imager, target, image, None)
                done.append(f"{key}: discarded half-made image {image.ref}")
            except Exception as exc:
                done.append(f"{key}: discarding {image.ref} failed: {exc}")
    _mark_failed(pending, done)
    pending.path.unlink(missing_ok=True)
    pending.path.with_name(pending.checkpoint_id + ".guard.jsonl").unlink(missing_ok=True)
    return done


def _handoff_abandoned(pending: Pending) -> str:
    """A controller that died while it held the tasks for a hand-off: the checkpoint
    is complete and stays; its manifest says the hand-off ended with the tasks thawed
    here (the guard's, or the lines above)."""
    said = "the controller died during the hand-off: the tasks were thawed here"
    if pending.state_dir is None:
        return said
    with contextlib.suppress(OSError, SnapcoreError):
        manifest = load(pending.state_dir, pending.checkpoint_id)
        if manifest.handoff and manifest.handoff.get("state") == "waiting":
            manifest.handoff = {**manifest.handoff, "state": "kept", "answer": {"outcome": None, "reason": said}}
            manifest.warnings.append(
                f"the controller (pid {pending.pid}) died during the hand-off; recovered at {utc_now()}"
            )
            manifest.write(pending.state_dir)
    return said


def _discard_export(pending: Pending, key: str, plugins: Plugins | None, target: Target) -> list[str]:
    """Undo one export of a dead checkpoint: the whole export when it returned, what
    it half wrote when it did not."""
    intent = pending.exporting[key]
    exporter = str(intent.get("exporter") or "")
    if plugins is None or exporter not in plugins.backends:
        return [f"{key}: cannot remove the export: backend {exporter!r} is not loaded"]
    try:
        if key in pending.exports:
            export = Export.from_json(pending.exports[key])
            plugins.discard(exporter, target, None, export)
            return [f"{key}: discarded the export {export.ref}"]
        done = plugins.discard_partial(exporter, target, Path(str(intent.get("dest") or "")))
        return [f"{key}: {line}" for line in done]
    except Exception as exc:
        return [f"{key}: removing the {exporter} export failed: {exc}"]


def _record_of(key: str, info: dict[str, Any]) -> TargetRecord:
    blank = {"mount": key, "source": "", "fstype": "", "imager": None, "exporter": None}
    return TargetRecord.from_json(info.get("record") or blank)


def _mark_failed(pending: Pending, done: list[str]) -> None:
    if pending.state_dir is None:
        return
    reason = f"the controller (pid {pending.pid}) died; recovered at {utc_now()}"
    path = manifest_path(pending.state_dir, pending.checkpoint_id)
    if path.exists():
        manifest = load(pending.state_dir, pending.checkpoint_id)
        if manifest.outcome == "ok":
            return
        manifest.warnings.append(reason)
    else:
        manifest = Manifest(id=pending.checkpoint_id, outcome="failed", started=pending.started or utc_now())
        manifest.error = reason
        for key, info in pending.targets.items():
            record = _record_of(key, info)
            record.outcome = "failed"
            record.image = None
            record.export = None
            record.image_record = None
            record.export_record = None
            manifest.targets.append(record)
    manifest.outcome = "failed"
    manifest.finished = utc_now()
    manifest.warnings.extend(done)
    drop_ghosts(manifest, pending.state_dir)
    manifest.write(pending.state_dir)


def recover(run_dir: Path, plugins: Plugins | None) -> list[tuple[str, list[str], bool]]:
    """Recover every journal under ``run_dir`` whose owner is dead: per checkpoint, its
    id, what was done, and whether it was complete (kept, not marked failed)."""
    journal_dir = run_dir / "journal"
    if not journal_dir.is_dir():
        return []
    # a journal says what root thaws and deletes: only from a place nobody else controls
    secure_dir(journal_dir)
    report = []
    for path in sorted(journal_dir.glob("*.jsonl")):
        if path.name.endswith(".guard.jsonl"):
            continue
        try:
            pending, alive = read_journal(path)
        except OSError:
            continue
        except SnapcoreError as exc:  # someone else's file: nothing in it is acted on
            report.append((path.name[: -len(".jsonl")], [f"journal left alone: {exc}"], False))
            continue
        if alive:
            continue
        report.append((pending.checkpoint_id, recover_one(pending, plugins), pending.ended == "ok"))
    return report
