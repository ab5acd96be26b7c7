"""The checkpoint transaction: one checkpoint over many targets.

:meth:`Transaction.run` is the seed's sequence, read top to bottom in
:meth:`Transaction._sequence`. What must be undone is registered where the step is
taken: on one :class:`~contextlib.ExitStack` for what outlives the freezes (the
locks, the journal, the manifest, what was made), and as nested ``with`` blocks for
the freezes themselves, so that they end in the sequence's order (the filesystems
thawed before the payload, the tasks after the change check) and, on any failure,
before anything is discarded.

A failure anywhere thaws everything, discards what this checkpoint made, and still
writes a manifest that says what failed. A cancellation (:attr:`Transaction.cancel`,
which the CLI sets on SIGTERM and SIGINT) is a failure like any other, seen at the
next step; the backends' long commands stop at once (``Target.cancel``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from snapcore.errors import Cancelled, CheckpointFailed, PolicyProblems, SnapcoreError, UnsupportedMount, UsageError
from snapcore.host.locks import MountLock, default_run_dir
from snapcore.host.mounts import MountTable, freeze_levels
from snapcore.log import get_logger
from snapcore.plugins import Plugins
from snapcore.policy import Policy, check_backends, resolved_options
from snapcore.safety.cancel import Cancel
from snapcore.safety.deadline import ProcessWatchdog, Watchdog
from snapcore.safety.faults import inject
from snapcore.safety.journal import Journal, recover, secure_dir
from snapcore.store.manifest import (
    Manifest,
    TargetRecord,
    check_checkpoint_id,
    drop_ghosts,
    manifest_path,
    new_checkpoint_id,
    utc_now,
)
from snapcore.transaction import images
from snapcore.transaction.handoff import HandOff, send_images
from snapcore.transaction.payload import Payload, run_payload
from snapcore.transaction.pool import shared_pool
from snapcore.transaction.select import resolve_mounts, select, task_mounts
from snapcore.transaction.targets import TargetRun, TaskSpec, describe
from snapcore.transaction.tasks_step import HeldTasks
from snapcore.transaction.window import FreezeWindow
from snapcore.types import Checkpoint, Image, Mount, Outcome, Phase, Role, Target

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from snapcore.policy import Rule

log = get_logger("snapcore.transaction")

#: A meeting point's callback (:attr:`Transaction.barrier`): the point's name and the
#: transaction; it returns to go on, raises to fail the checkpoint.
Barrier = Callable[[str, "Transaction"], None]


class Transaction:
    """One checkpoint over many targets. Use :meth:`run` or :meth:`hold`."""

    def __init__(
        self,
        plugins: Plugins,
        policy: Policy,
        paths: Sequence[str | os.PathLike[str]] = (),
        *,
        state_dir: Path,
        run_dir: Path | None = None,
        checkpoint_id: str | None = None,
        watchdog: Watchdog | None = None,
        table: MountTable | None = None,
        tasks: TaskSpec | None = None,
        cancel: Cancel | None = None,
        send_images: bool = False,
        hand_off: float | None = None,
        barrier: Barrier | None = None,
    ) -> None:
        #: Called at the sequence's meeting points (a cluster checkpoint's agent waits
        #: there for the other nodes; raising fails the checkpoint): ``ready`` (all
        #: prepared, nothing frozen), ``imaged`` (every filesystem imaged and still
        #: frozen), ``dumped`` (the payload done, the tasks still frozen); and
        #: ``end`` once the manifest is written, however it ended (not raising).
        self.barrier = barrier
        #: Set it (from any thread, or a signal handler) to cancel the checkpoint.
        self.cancel = cancel or Cancel()
        #: ``--send-images``: CRIU's images go into the export directories.
        self.send_images = send_images or hand_off is not None
        #: ``--hand-off S``: the tasks stay frozen until the destination answers.
        self.hand_off = HandOff(self, hand_off) if hand_off is not None else None
        self.task_spec = tasks
        #: The checkpoint's tasks, once resolved (None: a checkpoint of mounts alone).
        self.tasks: HeldTasks | None = None
        self.plugins = plugins
        self.policy = policy
        self.paths = list(paths)
        self.state_dir = state_dir
        self.run_dir = run_dir or default_run_dir()
        self.id = check_checkpoint_id(checkpoint_id) if checkpoint_id else new_checkpoint_id()
        self.journal = Journal(self.run_dir, self.id)
        self.watchdog: Watchdog = watchdog or ProcessWatchdog(record=str(self.journal.guard_record))
        self.table = table
        self.runs: list[TargetRun] = []
        #: the runs by freeze level: a mount before the mounts beneath it
        self.levels: list[list[TargetRun]] = []
        self.manifest = Manifest(id=self.id, outcome=Outcome.FAILED.value, started=utc_now(), policy=policy.path)
        self.info: Checkpoint | None = None
        self.window = FreezeWindow(self)
        self.deadline_s = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._t0 = time.perf_counter()
        self._written = False

    # -- public ------------------------------------------------------------------

    def run(self, payload: Payload | None = None) -> Manifest:
        """The whole checkpoint in one call; raises :class:`CheckpointFailed` on failure
        (its manifest, written, says what failed)."""
        self._resolve()
        try:
            with self._sequence(payload):
                pass
        except Exception as exc:
            raise CheckpointFailed(self.manifest.error or "checkpoint failed", self.manifest) from exc
        return self.manifest

    @contextmanager
    def hold(self) -> Iterator[Transaction]:
        """Hold every target imaged and frozen for the body of a ``with``.

        The body runs inside the freeze window (bounded by ``freeze_timeout``); on
        any exit the targets are thawed, exports run, and the manifest is written.
        An exception from the body fails the checkpoint and is re-raised.
        """
        self._resolve()
        try:
            with self._sequence(None):
                yield self
        except SnapcoreError as exc:
            raise CheckpointFailed(self.manifest.error or str(exc), self.manifest) from exc

    def rehearse(self) -> list[str]:
        """Resolve the targets and select their backends as :meth:`run` would, on a
        transaction that is then thrown away (it changes nothing): what would refuse
        the checkpoint (a bad policy, no usable backend, tasks on no mount that can be
        checkpointed) is raised before someone else stops the tasks for it (a
        runtime's CRIU), and what the checkpoint will need is loaded. Returns the
        mount points."""
        self._select(self._targets())
        if self.tasks is not None:
            self.tasks.rehearse()
        return [run.mount_point for run in self.runs]

    def image_of(self, mount_point: str) -> Image | None:
        for run in self.runs:
            if run.mount_point == mount_point:
                return run.image
        return None

    @property
    def active(self) -> list[TargetRun]:
        """The targets still in the checkpoint (not dropped)."""
        return [r for r in self.runs if not r.dropped]

    # -- the sequence ------------------------------------------------------------

    @contextmanager
    def _sequence(self, payload: Payload | None) -> Iterator[None]:
        """Everything after :meth:`_resolve`; the body of the ``with`` (``hold``'s)
        runs with every filesystem frozen and imaged. ``held`` keeps what must outlast
        the manifest (the locks, the journal, the guard); ``undo`` everything else,
        its first entry (so its last act) writing the manifest."""
        tasks = self.tasks
        with ExitStack() as held, ExitStack() as undo:
            if tasks and self.hand_off is not None:
                # the tasks stay frozen past the end: the guard and the journal last
                # until the destination answered and they were ended or thawed
                held.callback(self.watchdog.stop)
                held.callback(self._close_journal)
                held.callback(tasks.hand_over)
                held.callback(self._end)  # the export's manifest copy: what the destination waits for
                held.callback(tasks.announce_hand_off)  # journalled before that copy is published
            else:
                held.callback(self._end)  # checkpoint_end, last of all
                held.callback(self.watchdog.stop)
            held.callback(self._meet_end)  # the manifest is written, the guard still there
            undo.push(self._write_manifest)  # what was made, or what failed: after every undo below
            self._make_manifest_dir()
            self._recover_crashed()
            self._lock_mounts(held)
            self._open_journal(None if tasks and self.hand_off is not None else held)
            self._prepare(undo)
            self._meet("ready")
            with tasks.frozen() if tasks else nullcontext():  # freeze the tasks: the last to thaw
                undo.push(self._discard_if_failed)
                with self.window.frozen():  # freeze the filesystems: thawed at the end of this block
                    images.snapshot_all(self)
                    images.export_all(self, [r for r in self.active if r.live and r.target.exporter])
                    self.window.check_deadline()
                    self.cancel.check()
                    self._meet("imaged")
                    yield  # the body of hold()
                if payload is not None:
                    self._timed(Phase.PAYLOAD, run_payload, self, payload)
                self._meet("dumped")
                self._timed(Phase.EXPORT, images.export_all, self, [r for r in self.active if r.target.exporter])
                if tasks:
                    tasks.check_changes()
                if self.send_images:  # with the ghost copies made late, by check_changes
                    self._timed(Phase.SEND_IMAGES, send_images, self)
            if tasks:
                tasks.wait_for_dumped()
            self._timed(Phase.FINISH, self._finish)
            self.cancel.check()  # the last moment a cancellation undoes the checkpoint
            for run in self.active:
                images.record(run, tasks_stopped=tasks is not None and tasks.stopped_at is not None)
            if self.hand_off is not None:
                self.manifest.handoff = self.hand_off.waiting()
            self.manifest.outcome = Outcome.OK.value

    def _resolve(self) -> None:
        """Resolve the targets and select their backends; changes nothing.

        A problem found here is the caller's (bad policy, bad path, no usable
        backend for a required target): it is raised as it is, exit code 2, and no
        manifest is written, since no checkpoint was attempted. With tasks, their
        inventory is taken here: the mounts they use are the targets.
        """
        # the guard process starts first: its start-up overlaps resolving and preparing
        self.watchdog.start()
        try:
            self._select(self._targets())
        except BaseException:
            self.watchdog.stop()
            raise

    def _targets(self) -> list[tuple[Mount, Rule]]:
        t = time.perf_counter()
        problems = check_backends(self.policy, self.plugins)
        if problems:
            raise PolicyProblems(problems)
        table = self.table or MountTable.read()
        self.table = table
        spec = self.task_spec
        if spec is not None:
            found = task_mounts(table, self.policy, self.paths, spec, own=(self.state_dir, self.run_dir))
            self.manifest.tasks = found.taskset.to_json()
            self.tasks = HeldTasks(self, spec, found.taskset, found.inventory)
            mounts, warnings = found.mounts, found.warnings
        else:
            mounts, warnings = resolve_mounts(table, self.policy, self.paths)
        self.manifest.warnings.extend(warnings)
        path = manifest_path(self.state_dir, self.id)
        if path.exists():
            raise UsageError(f"checkpoint {self.id!r} already exists ({path})")
        self.phase(Phase.RESOLVE, t)
        return mounts

    def _select(self, mounts: list[tuple[Mount, Rule]]) -> None:
        t = time.perf_counter()
        by_mount: dict[int, TargetRun] = {}
        for mount, rule in mounts:
            sel = select(self.plugins, mount, rule)
            record = TargetRecord(
                mount=mount.mount_point,
                source=mount.source,
                fstype=mount.fstype,
                imager=sel.imager,
                exporter=sel.exporter,
                device=mount.devnode,
            )
            if sel.imager is None:
                if rule.required:
                    raise UnsupportedMount(sel.error or "no usable imager")
                record.outcome = Outcome.SKIPPED.value
                record.warnings.append(f"skipped (required: false): {sel.error}")
                self.manifest.targets.append(record)
                continue
            backends = [sel.imager] + ([sel.exporter] if sel.exporter else [])
            target = Target(
                checkpoint_id=self.id,
                mount=mount,
                imager=sel.imager,
                exporter=sel.exporter,
                options=MappingProxyType(resolved_options(self.policy, rule, backends, self.plugins)),
                required=rule.required,
                freeze_timeout=rule.freeze_timeout,
                keep=rule.keep,
                state_dir=self.state_dir,
                cancel=self.cancel,
            )
            record.options = {name: dict(opts) for name, opts in target.options.items()}
            if rule.keep is not None:
                record.keep = {"last": rule.keep.last, "within": rule.keep.within}
            run = TargetRun(target=target, record=record, live=self.plugins.info(sel.imager).live_image)
            self.runs.append(run)
            self.manifest.targets.append(record)
            by_mount[mount.mount_id] = run
        assert self.table is not None
        levels = freeze_levels(self.table, [r.target.mount for r in self.runs])
        self.levels = [[by_mount[m.mount_id] for m in level] for level in levels]
        self.info = Checkpoint(
            id=self.id,
            targets=tuple(r.target for r in self.runs),
            policy=self.policy.path,
            state_dir=self.state_dir,
            started=self.manifest.started,
        )
        self.phase(Phase.SELECT, t)

    def _make_manifest_dir(self) -> None:
        """The manifest's directory is made now: a state or run directory we cannot
        write to (or that someone else controls) fails before anything is frozen."""
        self.cancel.check()
        path = manifest_path(self.state_dir, self.id)
        secure_dir(self.state_dir)
        secure_dir(path.parent.parent)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.parent.is_symlink():
            raise SnapcoreError(f"{path.parent} is a symlink: refusing to write through it")
        secure_dir(self.run_dir)
        self._check_run_dir()

    def _check_run_dir(self) -> None:
        """The journal is written inside the window: never on a mount we freeze."""
        from snapcore.host.mounts import mount_id_of

        run_mount = mount_id_of(self.run_dir)
        for run in self.runs:
            if run.target.mount.mount_id == run_mount:
                raise UsageError(
                    f"the run directory {self.run_dir} is on {run.mount_point}, which this checkpoint freezes: "
                    "put it elsewhere (--run-dir or SNAPCORE_RUN_DIR; /run/snapcore by default)"
                )

    def _recover_crashed(self) -> None:
        """Thaw and clean up after checkpoints whose controllers died (their journals)."""
        for checkpoint_id, done, _complete in recover(self.run_dir, self.plugins):
            what = "; ".join(done) or "nothing left"
            self.manifest.warnings.append(f"recovered crashed checkpoint {checkpoint_id}: {what}")

    def _lock_mounts(self, undo: ExitStack) -> None:
        for run in self.runs:
            lock = MountLock(self.run_dir, run.mount_point, self.id)
            lock.acquire()
            undo.callback(lock.release)

    def _open_journal(self, undo: ExitStack | None) -> None:
        """Intents are written before acting: a controller that dies leaves what
        ``recover`` (or the next checkpoint) needs to undo it. ``undo`` closes it
        (None: the caller already arranged the close)."""
        self.journal.open(state_dir=str(self.state_dir), started=self.manifest.started)
        if undo is not None:
            undo.callback(self._close_journal)
        self.journal.record_many(
            [{"op": "target", "key": r.mount_point, "record": r.record.to_json()} for r in self.runs]
        )

    def _close_journal(self) -> None:
        if self._written:  # nothing is left for a recovery to do
            self.journal.close(self.manifest.outcome)
        else:  # the journal stays: 'snapcore recover' will write the failed manifest
            self.journal.detach()

    def _prepare(self, undo: ExitStack) -> None:
        """The backends get ready (nothing is frozen yet); the tasks are readied and
        watched; the guard learns what to thaw if we die."""
        t = time.perf_counter()
        for run in self.runs:
            try:
                self._prepare_one(run)
            except Exception as exc:
                if run.target.required:
                    run.record.error = describe(exc)
                    raise
                self._drop(run, Phase.PREPARE, exc)
        # copying ahead (an exporter's pre-copy) happens now, while the tasks still run;
        # what it wrote goes if the checkpoint fails before its export
        undo.push(self._discard_precopies_if_failed)
        images.precopy_all(self)
        rescues = {}
        for run in self.active:
            run.rescue = self.plugins.rescue(run.target.imager, run.target)
            if run.rescue is not None:
                rescues[run.mount_point] = run.rescue
        if self.tasks is not None:
            undo.callback(self.tasks.release)
            rescues.update(self.tasks.prepare())
        self.watchdog.watch(rescues)
        self.phase(Phase.PREPARE, t)
        if not self.active:
            raise SnapcoreError("no target left to checkpoint")
        self.deadline_s = min(r.target.freeze_timeout for r in self.active)
        self.watchdog.start()
        self.cancel.check()
        width = max((len(level) for level in self.levels), default=1)
        if width > 1:
            self._pool = shared_pool(min(width, 64))

    def _prepare_one(self, run: TargetRun) -> None:
        t = time.perf_counter()
        self.plugins.prepare(run.target.imager, run.target, Role.IMAGER)
        run.prepared.append(run.target.imager)
        if run.target.exporter:
            self.plugins.prepare(run.target.exporter, run.target, Role.EXPORTER)
            run.prepared.append(run.target.exporter)
        run.time(Phase.PREPARE, t)

    def _finish(self) -> None:
        for run in self.active:
            self.cancel.check()
            images.finish(self, run)

    # -- undo --------------------------------------------------------------------

    def _discard_if_failed(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """A failed checkpoint keeps nothing it made: every export and image goes
        (after every target and task is thawed)."""
        if exc is not None:
            t = time.perf_counter()
            for run in reversed(self.runs):
                images.discard(self, run)
            self.phase(Phase.DISCARD, t)
        return False

    def _discard_precopies_if_failed(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is not None:
            for run in self.runs:
                images.discard_precopy(self, run)
        return False

    def _write_manifest(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        """The manifest, written whatever happened: what was made, or what failed.
        If it cannot be written, what was made is undone (an image without a manifest
        is a half-made checkpoint) and the journal stays for ``recover``."""
        if exc is not None:
            self._record_failure(exc)
        self.manifest.finished = utc_now()
        self.manifest.timings["total"] = round((time.perf_counter() - self._t0) * 1000, 3)
        t = time.perf_counter()
        try:
            inject("manifest")
            self.manifest.write(self.state_dir)
            self._written = True
        except Exception as write_error:
            log.error("cannot write the manifest to %s: %s", self.state_dir, describe(write_error))
            if exc is None:
                for run in reversed(self.runs):
                    images.discard(self, run)
                    if run.record.outcome == Outcome.OK.value:
                        run.record.outcome = Outcome.FAILED.value
                self.manifest.outcome = Outcome.FAILED.value
                self.manifest.error = f"cannot write the manifest under {self.state_dir}: {describe(write_error)}"
                self.phase(Phase.MANIFEST, t)
                raise SnapcoreError(self.manifest.error) from write_error
        self.phase(Phase.MANIFEST, t)
        return False

    def _record_failure(self, exc: BaseException) -> None:
        self.manifest.outcome = Outcome.FAILED.value
        self.manifest.error = describe(exc)
        if self.cancel.is_set() and not isinstance(exc, Cancelled):
            # what the cancellation broke (tar killed by the same SIGTERM, say)
            self.manifest.error = f"cancelled ({self.cancel.reason}): {describe(exc)}"
        for run in self.runs:
            if run.record.outcome != Outcome.SKIPPED.value:
                run.record.outcome = Outcome.FAILED.value
        drop_ghosts(self.manifest, self.state_dir)

    def _end(self) -> None:
        self._pool = None  # the shared pool stays, idle, for the next checkpoint
        if self.info is not None:  # the manifest is written: what goes wrong now is only said
            for warning in self.plugins.checkpoint_end(self.info, Outcome(self.manifest.outcome), self.manifest):
                log.warning("%s", warning)

    # -- helpers -----------------------------------------------------------------

    def _meet_end(self) -> None:
        """The barrier's last call, ``end``, however the checkpoint ended: said, never raised."""
        if self.barrier is not None:
            try:
                self.barrier("end", self)
            except Exception as exc:
                log.warning("the barrier's end failed: %s", describe(exc))

    def _meet(self, point: str) -> None:
        if self.barrier is not None:
            t = time.perf_counter()
            self.barrier(point, self)
            self.manifest.timings[f"barrier_{point}"] = round((time.perf_counter() - t) * 1000, 3)
            self.cancel.check()

    def phase(self, phase: Phase, start: float) -> None:
        """Record how long ``phase`` took, since ``start`` (``time.perf_counter()``)."""
        self.manifest.timings[phase.value] = round((time.perf_counter() - start) * 1000, 3)

    def _timed(self, phase: Phase, step: Callable[..., None], *args: Any) -> None:
        t = time.perf_counter()
        step(*args)
        self.phase(phase, t)

    def each(self, runs: Sequence[TargetRun], phase: Phase, step: Callable[[TargetRun], None]) -> None:
        """Run ``step`` on every run, in parallel when a pool exists; then raise the
        first failure of a required target (non-required ones are dropped)."""
        self.cancel.check()
        runs = [r for r in runs if not r.dropped]
        errors: list[tuple[TargetRun, BaseException]] = []
        if self._pool is None or len(runs) <= 1:
            for run in runs:
                try:
                    step(run)
                except BaseException as exc:
                    errors.append((run, exc))
                    if run.target.required:
                        break
        else:
            futures: list[tuple[TargetRun, Future[None]]] = [(r, self._pool.submit(step, r)) for r in runs]
            for run, future in futures:
                error = future.exception()
                if error is not None:
                    errors.append((run, error))
        if errors:
            # a target that stopped because the checkpoint was cancelled is no
            # target to drop: the whole checkpoint is cancelled
            self.cancel.check()
        first: BaseException | None = None
        for run, error in errors:
            if run.target.required or not isinstance(error, Exception):
                run.record.error = f"{phase.value}: {describe(error)}"
                first = first or error
            else:
                self._drop(run, phase, error)
        if first is not None:
            raise first

    def _drop(self, run: TargetRun, phase: Phase, exc: BaseException) -> None:
        """A target that is not required failed: it becomes a warning."""
        run.dropped = True
        run.record.outcome = Outcome.FAILED.value
        run.record.error = f"{phase.value}: {describe(exc)}"
        run.record.warnings.append(f"not required, so the checkpoint went on without it ({phase.value} failed)")
        self.manifest.warnings.append(f"{run.mount_point}: {phase.value} failed: {describe(exc)}")
