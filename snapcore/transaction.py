"""The checkpoint transaction (DESIGN steps 1-3 and 6-10).

resolve → select → prepare → before_freeze → freeze (parallel, innermost first) →
snapshot (parallel) → export of live images → [body of ``hold``] → thaw (reverse,
always) → after_thaw → payload → export → manifest → checkpoint_end.

Any failure thaws everything, discards what this checkpoint made, and still writes
a manifest that says what failed. A cancellation (:attr:`Transaction.cancel`, which
the CLI sets on SIGTERM and SIGINT) is a failure like any other, seen at the next
step; the backends' long commands stop at once (``Target.cancel``). Tasks (freezing processes, open-file inventory)
join in a later step: :meth:`Transaction._resolve` and the window are their seams.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from snapcore.cancel import Cancel
from snapcore.errors import (
    Cancelled,
    CheckpointFailed,
    DeadlineExceeded,
    PluginError,
    SnapcoreError,
    UnsupportedMount,
    UsageError,
)
from snapcore.faults import inject
from snapcore.journal import Journal, recover, secure_dir
from snapcore.locks import MountLock, default_run_dir
from snapcore.log import get_logger
from snapcore.manifest import (
    Manifest,
    TargetRecord,
    check_checkpoint_id,
    drop_ghosts,
    manifest_path,
    new_checkpoint_id,
    utc_now,
)
from snapcore.mounts import MountTable, freeze_levels, is_pseudo, resolve_paths
from snapcore.plugins import Plugins
from snapcore.policy import (
    Policy,
    PolicyProblems,
    Rule,
    check_backends,
    resolved_options,
)
from snapcore.types import (
    Checkpoint,
    Consistency,
    Export,
    Image,
    Mount,
    Outcome,
    Phase,
    Rescue,
    RescueKind,
    Role,
    Support,
    Target,
)
from snapcore.watchdog import ProcessWatchdog, Watchdog

if TYPE_CHECKING:  # the pool and subprocesses are imported when used: the CLI starts fast
    from concurrent.futures import Future, ThreadPoolExecutor

log = get_logger(__name__)

#: What a payload may be: a command line, or a callable given the checkpoint.
Payload = Sequence[str] | Callable[[Checkpoint], int | None]


#: How long a checkpoint whose payload was ``criu dump`` waits for the dumped tasks'
#: PIDs to be free (PID 1 reaps them; 1-2 s were seen on a loaded machine).
DUMPED_TASKS_GONE_S = 10.0


# -- selection -----------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Selection:
    """The plan for one mount: chosen backends and every backend's answer."""

    mount: Mount
    rule: Rule
    imager: str | None = None
    exporter: str | None = None
    answers: dict[str, Support | None] = field(default_factory=dict)
    error: str | None = None

    def why(self) -> str:
        if self.imager is None:
            return self.error or "no usable imager"
        answer = self.answers.get(self.imager)
        how = "chosen by the policy" if not self.rule.auto else "best probe"
        return f"{how}: {answer.reason}" if answer else how


def select(plugins: Plugins, mount: Mount, rule: Rule) -> Selection:
    """Pick the imager for ``mount``: the policy's first usable choice, else the best probe."""
    sel = Selection(mount=mount, rule=rule, exporter=rule.exporter)
    imagers = plugins.names(Role.IMAGER)
    for name in imagers:
        sel.answers[name] = plugins.probe(name, mount)
    if rule.auto:
        # a score of 0 means "usable when named, never chosen by auto" (``none``)
        usable = [(a.score, n) for n, a in sel.answers.items() if a is not None and a.ok and a.score > 0]
        if usable:
            sel.imager = max(usable, key=lambda s: (s[0], [-ord(c) for c in s[1]]))[1]
    else:
        for name in rule.imager:
            if name not in plugins.backends:
                continue
            answer = sel.answers.get(name)
            if answer is None or answer.ok:
                sel.imager = name
                break
    if sel.imager is None:
        considered = imagers if rule.auto else list(rule.imager)
        reasons = []
        for name in considered:
            answer = sel.answers.get(name)
            if name not in plugins.backends:
                reasons.append(f"{name}: not installed")
            elif answer is None:
                reasons.append(f"{name}: no answer")
            else:
                reasons.append(f"{name}: {answer.reason}")
        sel.error = f"no usable imager for {mount.mount_point} ({mount.fstype}): " + "; ".join(reasons)
    return sel


def resolve_mounts(
    table: MountTable, policy: Policy, paths: Sequence[str | os.PathLike[str]]
) -> tuple[list[tuple[Mount, Rule]], list[str]]:
    """The mounts to checkpoint with their rules, and warnings for skipped ones."""
    warnings: list[str] = []
    result: list[tuple[Mount, Rule]] = []
    if paths:
        for mount in resolve_paths(table, paths):
            rule = policy.rule_for(mount.mount_point)
            if rule is None:
                raise UsageError(
                    f'{mount.mount_point} is not covered by the policy {policy.path} (add a rule for it, or a "*" rule)'
                )
            result.append((mount, rule))
        return result, warnings
    if not policy.rules:
        raise UsageError("nothing to checkpoint: give PATHs, or a --policy that names mounts")
    seen: set[int] = set()
    for key, rule in policy.rules.items():
        try:
            if not Path(key).exists():
                raise UsageError(f"{key}: no such file or directory")
            mount = table.find(key)
            if is_pseudo(mount):
                raise UnsupportedMount(f"{key} is a {mount.fstype} pseudo filesystem")
            if mount.mount_point != key:
                raise UsageError(f"{key} is not a mount point (it is inside the mount {mount.mount_point})")
        except SnapcoreError as exc:
            if rule.required:
                raise UsageError(f"policy {policy.path}, mount {key}: {exc}") from None
            warnings.append(f"{key} skipped (required: false): {exc}")
            continue
        if mount.mount_id not in seen:
            seen.add(mount.mount_id)
            result.append((mount, rule))
    return result, warnings


def plan(
    plugins: Plugins, policy: Policy, paths: Sequence[str | os.PathLike[str]] = (), table: MountTable | None = None
) -> tuple[list[Selection], list[str]]:
    """What a checkpoint would do; probes only, touches nothing."""
    problems = check_backends(policy, plugins)
    if problems:
        raise PolicyProblems(problems)
    table = table or MountTable.read()
    mounts, warnings = resolve_mounts(table, policy, paths)
    return [select(plugins, m, r) for m, r in mounts], warnings


# -- the transaction -------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SnapcoreError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True, kw_only=True)
class TargetRun:
    """A target's mutable state during one transaction."""

    target: Target
    record: TargetRecord
    live: bool = False
    image: Image | None = None
    export: Export | None = None
    frozen: bool = False
    dropped: bool = False
    rescue: Rescue | None = None
    prepared: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def mount_point(self) -> str:
        return self.target.mount.mount_point

    def time(self, phase: Phase, start: float) -> None:
        self.record.timings[phase.value] = round((time.perf_counter() - start) * 1000, 3)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """The tasks of a checkpoint: a process and its descendants, or a cgroup."""

    pid: int | None = None
    cgroup: str | None = None
    #: Someone else already stopped the tasks (``"CRIU"`` in an action script):
    #: they are inventoried and watched, not frozen again.
    stopped_by: str | None = None
    #: CRIU's image directory, for the manifest.
    criu_images: str | None = None


class ChangeDetected(SnapcoreError):
    """A file the tasks need changed between their freeze and thaw (``on_change: fail``)."""


class PayloadFailed(SnapcoreError):
    """The caller's command (``-- CMD``) failed; its status decides the outcome."""


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
    ) -> None:
        #: Set it (from any thread, or a signal handler) to cancel the checkpoint.
        self.cancel = cancel or Cancel()
        self.task_spec = tasks
        self.taskset: Any = None
        self.inventory: Any = None
        self.freezer: Any = None
        self.watch: Any = None
        self._tasks_frozen_at: float | None = None
        self._task_rescues: dict[str, Rescue] = {}
        self._thawed_keys: list[str] = []
        self._thawed_lock = threading.Lock()
        self.plugins = plugins
        self.policy = policy
        self.paths = list(paths)
        self.state_dir = state_dir
        self.run_dir = run_dir or default_run_dir()
        self.id = check_checkpoint_id(checkpoint_id) if checkpoint_id else new_checkpoint_id()
        self.journal = Journal(self.run_dir, self.id)
        self.watchdog: Watchdog = watchdog or ProcessWatchdog(record=str(self.journal.guard_record))
        self.locks: list[MountLock] = []
        self.table = table
        self.runs: list[TargetRun] = []
        self.levels: list[list[TargetRun]] = []
        self.manifest = Manifest(id=self.id, outcome=Outcome.FAILED.value, started=utc_now(), policy=policy.path)
        self.info: Checkpoint | None = None
        self.expired = False
        self.deadline_s = 0.0
        self._pool: ThreadPoolExecutor | None = None
        self._before_freeze_ran = False
        self._window_start: float | None = None
        self._t0 = time.perf_counter()
        self._failure: BaseException | None = None

    # -- public ------------------------------------------------------------------

    def run(self, payload: Payload | None = None) -> Manifest:
        """The whole checkpoint in one call; raises :class:`CheckpointFailed` on failure."""
        self._resolve_or_stop()
        try:
            self._prepare_all()
            self._freeze_tasks()
            with self._window():
                pass
            self._after_window(payload)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._close()
        if self._failure is not None:
            if not isinstance(self._failure, Exception):
                raise self._failure
            raise CheckpointFailed(self.manifest.error or "checkpoint failed", self.manifest)
        return self.manifest

    @contextmanager
    def hold(self) -> Iterator[Transaction]:
        """Hold every target imaged and frozen for the body of a ``with``.

        The body runs inside the freeze window (bounded by ``freeze_timeout``); on
        any exit the targets are thawed, exports run, and the manifest is written.
        An exception from the body fails the checkpoint and is re-raised.
        """
        self._resolve_or_stop()
        try:
            self._prepare_all()
            self._freeze_tasks()
            with self._window():
                yield self
            self._after_window(None)
        except BaseException as exc:
            self._fail(exc)
            self._close()
            if isinstance(exc, SnapcoreError):
                raise CheckpointFailed(self.manifest.error or str(exc), self.manifest) from exc
            raise
        self._close()

    def image_of(self, mount_point: str) -> Image | None:
        for run in self.runs:
            if run.mount_point == mount_point:
                return run.image
        return None

    # -- steps -------------------------------------------------------------------

    def _phase(self, phase: Phase, start: float) -> None:
        self.manifest.timings[phase.value] = round((time.perf_counter() - start) * 1000, 3)

    def _resolve_or_stop(self) -> None:
        # the guard process starts first: its start-up overlaps resolving and preparing
        self.watchdog.start()
        try:
            self._resolve()
        except BaseException:
            self.watchdog.stop()
            raise

    def _resolve(self) -> None:
        """Resolve the targets and select their backends; changes nothing.

        A problem found here is the caller's (bad policy, bad path, no usable
        backend for a required target): it is raised as it is, exit code 2, and no
        manifest is written, since no checkpoint was attempted.
        """
        t = time.perf_counter()
        problems = check_backends(self.policy, self.plugins)
        if problems:
            raise PolicyProblems(problems)
        table = self.table or MountTable.read()
        if self.task_spec is not None:
            mounts, warnings = self._task_mounts(table)
        else:
            mounts, warnings = resolve_mounts(table, self.policy, self.paths)
        self.manifest.warnings.extend(warnings)
        path = manifest_path(self.state_dir, self.id)
        if path.exists():
            raise UsageError(f"checkpoint {self.id!r} already exists ({path})")
        self._phase(Phase.RESOLVE, t)

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
        levels = freeze_levels(table, [r.target.mount for r in self.runs])
        self.levels = [[by_mount[m.mount_id] for m in level] for level in levels]
        self.info = Checkpoint(
            id=self.id,
            targets=tuple(r.target for r in self.runs),
            policy=self.policy.path,
            state_dir=self.state_dir,
            started=self.manifest.started,
        )
        self._phase(Phase.SELECT, t)

    def _prepare_all(self) -> None:
        """Recover crashed checkpoints, lock, journal, prepare. Nothing is frozen here."""
        self.cancel.check()
        path = manifest_path(self.state_dir, self.id)
        # the manifest's directory is made now: a state dir we cannot write to must
        # fail before anything is frozen, not after
        secure_dir(self.state_dir)
        secure_dir(path.parent.parent)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.parent.is_symlink():
            raise SnapcoreError(f"{path.parent} is a symlink: refusing to write through it")
        secure_dir(self.run_dir)
        self._check_run_dir()
        for checkpoint_id, done in recover(self.run_dir, self.plugins):
            what = "; ".join(done) or "nothing left"
            self.manifest.warnings.append(f"recovered crashed checkpoint {checkpoint_id}: {what}")
        for run in self.runs:
            lock = MountLock(self.run_dir, run.mount_point, self.id)
            lock.acquire()
            self.locks.append(lock)
        self.journal.open(state_dir=str(self.state_dir), started=self.manifest.started)
        self.journal.record_many(
            [{"op": "target", "key": r.mount_point, "record": r.record.to_json()} for r in self.runs]
        )

        t = time.perf_counter()
        for run in self.runs:
            try:
                self._prepare(run)
            except Exception as exc:
                if run.target.required:
                    run.record.error = _describe(exc)
                    raise
                self._drop(run, Phase.PREPARE, exc)
        rescues = {}
        for run in self.active:
            rescue = self.plugins.rescue(run.target.imager, run.target)
            run.rescue = rescue
            if rescue is not None:
                rescues[run.mount_point] = rescue
        if self.taskset is not None:
            from snapcore.tasks import TaskFreezer
            from snapcore.watch import Watch

            spec = self.task_spec
            assert spec is not None
            if spec.stopped_by is None:
                self.journal.record("tasks", name=self.id)
                self.freezer = TaskFreezer(self.taskset, name=self.id)
                self.freezer.attach()  # moving tasks costs an RCU wait: outside the window
                # the guard thaws the tasks too if we die: nothing may depend on us
                self._task_rescues = {
                    f"tasks:{path}": Rescue(kind=RescueKind.WRITE, path=path, value=value)
                    for path, value in self.freezer.rescues()
                }
                rescues.update(self._task_rescues)
            else:
                self.manifest.tasks = {**self.taskset.to_json(), "method": f"stopped by {spec.stopped_by}"}
                self._tasks_frozen_at = time.monotonic()
            if spec.criu_images:
                self.manifest.criu = {"images_dir": spec.criu_images, "via": "action-script"}
            self.watch = Watch(self.inventory)
            self.watch.start()
        self.watchdog.watch(rescues)
        self._phase(Phase.PREPARE, t)
        if not self.active:
            raise SnapcoreError("no target left to checkpoint")
        self.deadline_s = min(r.target.freeze_timeout for r in self.active)
        self.watchdog.start()
        self.cancel.check()
        width = max((len(level) for level in self.levels), default=1)
        if width > 1:
            self._pool = _shared_pool(min(width, 64))

    def _task_mounts(self, table: MountTable) -> tuple[list[tuple[Mount, Rule]], list[str]]:
        """Targets from what the tasks use (DESIGN step 1), plus any PATHs named."""
        from snapcore.inventory import take_inventory
        from snapcore.mounts import mount_id_of
        from snapcore.tasks import resolve_cgroup, resolve_pid

        spec = self.task_spec
        assert spec is not None
        self.taskset = resolve_pid(spec.pid) if spec.pid is not None else resolve_cgroup(spec.cgroup or "")
        self.manifest.tasks = self.taskset.to_json()
        self.inventory = take_inventory(self.taskset.pids, table=table)
        result, warnings = resolve_mounts(table, self.policy, self.paths) if self.paths else ([], [])
        warnings.extend(self.inventory.warnings)
        seen = {m.mount_id for m, _ in result}
        own: set[int] = set()
        for path in (self.state_dir, self.run_dir):
            probe = path
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            own.add(mount_id_of(probe))
        for mount in self.inventory.mounts:
            if mount.mount_id in seen:
                continue
            named = mount.mount_point in self.policy.rules
            if not named and (mount.mount_point == "/" or mount.mount_id in own):
                why = "the root filesystem" if mount.mount_point == "/" else "it holds snapcore's state"
                warnings.append(f"{mount.mount_point}: used by the tasks but not frozen ({why}); name it to include it")
                continue
            rule = self.policy.rule_for(mount.mount_point)
            if rule is None:
                message = f"{mount.mount_point}: used by the tasks but not covered by the policy {self.policy.path}"
                if self.policy.uncovered == "fail":
                    raise UsageError(message + " (uncovered: fail)")
                warnings.append(message)
                continue
            seen.add(mount.mount_id)
            result.append((table.enrich(mount), rule))
        if not result:
            raise UsageError("the tasks use no mount that can be checkpointed (see the warnings with -v)")
        return result, warnings

    def _check_run_dir(self) -> None:
        """The journal is written inside the window: never on a mount we freeze."""
        from snapcore.mounts import mount_id_of

        run_mount = mount_id_of(self.run_dir)
        for run in self.runs:
            if run.target.mount.mount_id == run_mount:
                raise UsageError(
                    f"the run directory {self.run_dir} is on {run.mount_point}, which this checkpoint freezes: "
                    "put it elsewhere (--run-dir or SNAPCORE_RUN_DIR; /run/snapcore by default)"
                )

    def _prepare(self, run: TargetRun) -> None:
        t = time.perf_counter()
        self.plugins.prepare(run.target.imager, run.target, Role.IMAGER)
        run.prepared.append(run.target.imager)
        if run.target.exporter:
            self.plugins.prepare(run.target.exporter, run.target, Role.EXPORTER)
            run.prepared.append(run.target.exporter)
        run.time(Phase.PREPARE, t)

    @property
    def active(self) -> list[TargetRun]:
        return [r for r in self.runs if not r.dropped]

    def _drop(self, run: TargetRun, phase: Phase, exc: BaseException) -> None:
        """A target that is not required failed: it becomes a warning."""
        run.dropped = True
        run.record.outcome = Outcome.FAILED.value
        run.record.error = f"{phase.value}: {_describe(exc)}"
        run.record.warnings.append(f"not required, so the checkpoint went on without it ({phase.value} failed)")
        self.manifest.warnings.append(f"{run.mount_point}: {phase.value} failed: {_describe(exc)}")

    def _freeze_tasks(self) -> None:
        """DESIGN step 5: stop the tasks, then copy what only they still hold."""
        if self.inventory is None:
            return
        from snapcore.inventory import copy_ghosts

        if self.freezer is not None:
            self.journal.record_many(
                [{"op": "freeze", "key": key, "rescue": r.to_json()} for key, r in self._task_rescues.items()]
            )
            if self._task_rescues:
                self.watchdog.freezing(*self._task_rescues)
            t = time.perf_counter()
            self.freezer.freeze()
            self._tasks_frozen_at = time.monotonic()
            self.manifest.timings["tasks_freeze"] = round((time.perf_counter() - t) * 1000, 3)
        if self.inventory.ghosts_needed:
            ghosts = manifest_path(self.state_dir, self.id).parent / "ghosts"
            self.inventory = copy_ghosts(self.inventory, ghosts, limit=self.policy.ghost_limit)
        self.manifest.files = self.inventory.to_json()

    def _thaw_tasks(self) -> None:
        """Tasks go last: after the filesystems, whatever happened."""
        freezer, self.freezer = self.freezer, None
        try:
            if self.watch is not None:
                self.watch.stop()
        finally:
            if freezer is None and self._tasks_frozen_at is not None and self.manifest.tasks is not None:
                # stopped by CRIU before its post-dump hook: snapcore's share of the stop
                self.manifest.tasks["stopped_ms"] = round((time.monotonic() - self._tasks_frozen_at) * 1000, 3)
                self.manifest.tasks["stopped_note"] = "from the post-dump hook on; CRIU stopped them before"
            if freezer is not None:
                t = time.perf_counter()
                freezer.close()
                self.manifest.timings["tasks_thaw"] = round((time.perf_counter() - t) * 1000, 3)
                self.manifest.tasks = freezer.to_json()
                if self._tasks_frozen_at is not None:
                    # how long the program stood still: frozen until thawed (or ended by a CRIU dump)
                    self.manifest.tasks["stopped_ms"] = round((time.monotonic() - self._tasks_frozen_at) * 1000, 3)
                self.journal.record_many([{"op": "thawed", "key": key} for key in self._task_rescues])
                if self._task_rescues:
                    with contextlib.suppress(SnapcoreError):
                        self.watchdog.thawed(*self._task_rescues)

    def _check_changes(self) -> None:
        """DESIGN step 8: what changed under the frozen tasks decides (on_change)."""
        if self.watch is None:
            return
        from snapcore.inventory import FileState
        from snapcore.watch import ChangeKind, apply_changes

        nameless = {
            (f.dev, f.ino) for f in self.inventory.files if f.state in (FileState.DELETED, FileState.RENAMED_OVER)
        }
        changes = tuple(
            c
            for c in self.watch.results(since=self._tasks_frozen_at)
            # a file that had no name left is released when its last holder closes it
            # (CRIU ends the dumped tasks): that is no change to what was checkpointed
            if not (c.kind is ChangeKind.DELETE and (c.dev, c.ino) in nameless)
        )
        self.manifest.changes = [c.to_json() for c in changes]
        self.inventory = apply_changes(self.inventory, changes)
        late = [f for f in self.inventory.ghosts_needed if f.ghost is None]
        if late:
            # renamed over or deleted while the tasks were stopped: their old content
            # is still reachable through the tasks' descriptors (unless a CRIU dump
            # ended them: then the ghost says why it is missing)
            from snapcore.inventory import copy_ghosts

            ghosts = manifest_path(self.state_dir, self.id).parent / "ghosts"
            spent = sum(f.ghost.size for f in self.inventory.files if f.ghost is not None and f.ghost.path)
            left = max(0, self.policy.ghost_limit - spent)
            self.inventory = copy_ghosts(self.inventory, ghosts, limit=left, files=late)
        self.manifest.files = self.inventory.to_json()
        mount_of = {(f.dev, f.ino): f.mount_point for f in self.inventory.files}
        fatal = []
        for change in changes:
            mount_point = mount_of.get((change.dev, change.ino)) if change.dev is not None else None
            rule = self.policy.rule_for(mount_point) if mount_point else self.policy.fallback
            message = f"{change.path}: {change.kind} after the tasks were frozen"
            if rule is not None and rule.on_change == "warn":
                self.manifest.warnings.append(message)
            else:
                fatal.append(message)
        if fatal:
            raise ChangeDetected("a file the tasks need changed: " + "; ".join(fatal))

    def _each(self, runs: Sequence[TargetRun], phase: Phase, step: Callable[[TargetRun], None]) -> None:
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
                run.record.error = f"{phase.value}: {_describe(error)}"
                first = first or error
            else:
                self._drop(run, phase, error)
        if first is not None:
            raise first

    def _freeze_one(self, run: TargetRun) -> None:
        if self.expired:
            raise DeadlineExceeded(f"freeze_timeout ({self.deadline_s:g}s) passed before {run.mount_point} froze")
        self.cancel.check()
        t = time.perf_counter()
        try:
            self.plugins.freeze(run.target.imager, run.target)
        except BaseException:
            if run.rescue is not None:
                # not frozen by us (EBUSY: by someone else): nobody may thaw it for us.
                # A guard that died meanwhile thaws nothing either; its error must not
                # replace the freeze's own
                self.journal.record("thawed", key=run.mount_point, failed=True)
                with contextlib.suppress(SnapcoreError):
                    self.watchdog.thawed(run.mount_point)
            raise
        with run.lock:
            run.frozen = True
            late = self.expired
        run.time(Phase.FREEZE, t)
        if late:  # the watchdog went past this target while it was freezing
            self._thaw_one(run)
            self._flush_thawed()

    def _announce_freezes(self, level: Sequence[TargetRun]) -> None:
        """Intent first, once per level: a controller that dies from here on leaves a
        journal record and a guard that knows. One write and one message for the whole
        level: a guard woken once per target was measured to slow the parallel freezes
        (its CPU time lengthens the kernel's RCU waits inside FIFREEZE)."""
        runs = [r for r in level if r.rescue is not None and not r.dropped]
        if not runs:
            return
        self.journal.record_many(
            [{"op": "freeze", "key": r.mount_point, "rescue": r.rescue.to_json()} for r in runs if r.rescue]
        )
        self.watchdog.freezing(*(r.mount_point for r in runs))

    def _flush_thawed(self) -> None:
        with self._thawed_lock:
            keys, self._thawed_keys = self._thawed_keys, []
        if keys:
            self.journal.record_many([{"op": "thawed", "key": key} for key in keys])
            with contextlib.suppress(SnapcoreError):
                self.watchdog.thawed(*keys)

    def _snapshot_one(self, run: TargetRun) -> None:
        t = time.perf_counter()
        run.image = self.plugins.snapshot(run.target.imager, run.target)
        run.time(Phase.SNAPSHOT, t)

    def _snapshot_all(self) -> None:
        # intents before, images after, one journal write each: a crash in between
        # is cleaned up by listing the backend's images of this checkpoint id
        self.journal.record_many([{"op": "snapshot", "key": r.mount_point} for r in self.active])
        try:
            self._each(self.active, Phase.SNAPSHOT, self._snapshot_one)
        finally:
            made = [r for r in self.runs if r.image is not None]
            self.journal.record_many(
                [{"op": "image", "key": r.mount_point, "image": r.image.to_json()} for r in made if r.image]
            )

    def _export_one(self, run: TargetRun) -> None:
        exporter = run.target.exporter
        if exporter is None or run.image is None:
            return
        t = time.perf_counter()
        dest = run.target.options_for(exporter).get("dest")
        dest_path = Path(dest) if dest else run.target.checkpoint_dir / "exports" / exporter
        # a controller killed during the export leaves this intent: 'recover' asks the
        # exporter to remove what it half wrote (discard_partial)
        self.journal.record("export", key=run.mount_point, exporter=exporter, dest=str(dest_path))
        run.export = self.plugins.export(exporter, run.target, run.image, dest_path)
        self.journal.record("exported", key=run.mount_point, export=run.export.to_json())
        run.time(Phase.EXPORT, t)

    def _thaw_one(self, run: TargetRun) -> None:
        with run.lock:
            if not run.frozen:
                return
            run.frozen = False
        t = time.perf_counter()
        try:
            self.plugins.thaw(run.target.imager, run.target)
            if run.rescue is not None:
                with self._thawed_lock:
                    self._thawed_keys.append(run.mount_point)
        except BaseException as exc:
            run.record.error = f"thaw failed, the filesystem may still be frozen: {_describe(exc)}"
            log.error("%s: thaw failed: %s", run.mount_point, _describe(exc))
            self.manifest.warnings.append(f"{run.mount_point}: THAW FAILED: {_describe(exc)}")
            raise
        finally:
            run.time(Phase.THAW, t)

    def _thaw_all(self) -> BaseException | None:
        """Thaw every frozen target, innermost level last, reverse order; never stops early."""
        first: BaseException | None = None
        for level in reversed(self.levels):
            for run in reversed(level):
                try:
                    self._thaw_one(run)
                except BaseException as exc:
                    first = first or exc
        self._flush_thawed()
        return first

    def _expire(self) -> None:
        """Deadline watchdog: thaw everything now; the transaction will fail."""
        self.expired = True
        log.error("freeze window exceeded %gs: thawing every target", self.deadline_s)
        self._thaw_all()

    @contextmanager
    def _window(self) -> Iterator[None]:
        """before_freeze → freeze → snapshot → live exports → (body) → thaw → after_thaw."""
        assert self.info is not None
        t = time.perf_counter()
        self._before_freeze_ran = True
        self.plugins.before_freeze(self.info)
        self._phase(Phase.BEFORE_FREEZE, t)
        thaw_error: BaseException | None = None
        self.watchdog.arm(self.deadline_s, self._expire)
        self._window_start = time.perf_counter()
        try:
            for level in self.levels:
                self._announce_freezes(level)
                self._each(level, Phase.FREEZE, self._freeze_one)
            self._snapshot_all()
            live = [r for r in self.active if r.live and r.target.exporter]
            if live:
                self._each(live, Phase.EXPORT, self._export_one)
            self._check_deadline()
            self.cancel.check()
            yield
            self._check_deadline()
            self.cancel.check()
        finally:
            thaw_error = self._thaw_all()
            end = time.perf_counter()
            self.watchdog.disarm()
            self.manifest.freeze_window_ms = round((end - self._window_start) * 1000, 3)
            self._after_thaw()
        if thaw_error is not None:
            raise thaw_error
        self._check_deadline()

    def _check_deadline(self) -> None:
        if self.expired:
            raise DeadlineExceeded(
                f"the freeze window outlived freeze_timeout ({self.deadline_s:g}s); every target was thawed "
                "by the watchdog and the images are not trusted"
            )

    def _after_thaw(self) -> None:
        if not self._before_freeze_ran or self.info is None:
            return
        self._before_freeze_ran = False
        try:
            self.plugins.after_thaw(self.info)
        except Exception as exc:
            self.manifest.warnings.append(f"after_thaw raised {_describe(exc)}")

    def _after_window(self, payload: Payload | None) -> None:
        assert self.info is not None
        if payload is not None:
            t = time.perf_counter()
            self._run_payload(payload)
            self._phase(Phase.PAYLOAD, t)
        t = time.perf_counter()
        pending = [r for r in self.active if r.target.exporter and r.export is None]
        self._each(pending, Phase.EXPORT, self._export_one)
        self._phase(Phase.EXPORT, t)
        self._check_changes()
        self._thaw_tasks()
        self._wait_for_dumped_tasks()
        t = time.perf_counter()
        for run in self.active:
            self.cancel.check()
            self._finish(run)
        self._phase(Phase.FINISH, t)
        self.cancel.check()  # the last moment a cancellation undoes the checkpoint
        for run in self.active:
            self._settle(run)

    def _wait_for_dumped_tasks(self) -> None:
        """``criu dump`` (without ``--leave-running``/``--leave-stopped``) ends the
        tasks, but their PIDs stay taken until they are reaped, and ``criu restore``
        needs those very PIDs: the command returns once they are free, so that a
        restore right after it works."""
        argv = (self.manifest.criu or {}).get("argv")
        if not argv or self.taskset is None:
            return
        if any(a in ("-R", "--leave-running", "-s", "--leave-stopped") for a in argv):
            return
        from snapcore.tasks import wait_pids_free

        t = time.perf_counter()
        held = wait_pids_free(self.taskset.pids, DUMPED_TASKS_GONE_S)
        self.manifest.timings["dumped_tasks_gone"] = round((time.perf_counter() - t) * 1000, 3)
        if held:
            self.manifest.warnings.append(
                f"the dumped tasks' PIDs are still taken ({', '.join(str(h) for h in held)}): "
                "'criu restore' fails with 'File exists' until they are free"
            )

    def _finish(self, run: TargetRun) -> None:
        """Let the backends complete what they made, before the manifest says ok."""
        try:
            if run.image is not None:
                run.record.warnings += self.plugins.finish(run.target.imager, run.target, run.image, None)
            if run.export is not None and run.target.exporter:
                run.record.warnings += self.plugins.finish(run.target.exporter, run.target, run.image, run.export)
        except Exception as exc:
            run.record.error = f"{Phase.FINISH.value}: {_describe(exc)}"
            raise

    def _settle(self, run: TargetRun) -> None:
        record = run.record
        image = run.image
        if image is not None:
            if image.live and run.export is None:
                # the frozen live tree was the image and nobody copied it
                record.consistency = Consistency.QUIESCED.value
                record.warnings.append(
                    f"{run.target.imager} keeps no image without an exporter: the filesystem was synced "
                    "and frozen at the checkpoint instant, nothing more"
                )
            else:
                record.consistency = image.consistency.value
                if image.consistency is Consistency.CRASH_CONSISTENT and self._tasks_frozen_at is not None:
                    # nothing the checkpointed tasks wrote raced the snapshot
                    record.consistency = Consistency.TASKS_FROZEN.value
                record.image = image.ref
            record.image_record = image.to_json()
            # a backend's warnings about its image (e.g. btrfs: nested subvolumes left out)
            record.warnings.extend(str(w) for w in image.details.get("warnings") or ())
        if run.export is not None:
            record.export = run.export.ref
            record.export_record = run.export.to_json()
            record.warnings.extend(str(w) for w in run.export.details.get("warnings") or ())
        record.outcome = Outcome.OK.value

    def _run_payload(self, payload: Payload) -> None:
        assert self.info is not None
        inject("payload")
        if callable(payload):
            status = payload(self.info)
            if status:
                raise PayloadFailed(f"payload returned {status}")
            return
        cmd = list(payload)
        env = dict(os.environ)
        env["SNAPCORE_CHECKPOINT_ID"] = self.id
        env["SNAPCORE_STATE_DIR"] = str(self.state_dir)
        for i, run in enumerate(self.active):
            if run.image is not None and run.image.path:
                env[f"SNAPCORE_IMAGE_{i}"] = f"{run.mount_point}={run.image.path}"
        cmd = self._criu_payload(cmd, env)
        import subprocess

        self.cancel.check()
        try:
            proc = subprocess.Popen(cmd, env=env)
        except OSError as exc:
            raise PayloadFailed(f"cannot run {cmd[0]!r}: {exc.strerror}") from exc
        # cancelled: the payload is told as a terminal's Ctrl-C would tell it (it shares
        # our process group), and SIGTERM reaches it too
        with self.cancel.on_cancel(proc.terminate):
            try:
                proc.wait()
            finally:
                if proc.returncode is None:  # interrupted by an exception: no payload left behind
                    proc.kill()
                    proc.wait()
        self.manifest.payload = {"argv": cmd, "status": proc.returncode}
        self.cancel.check()
        if proc.returncode != 0:
            from snapcore.criu import describe_failure

            raise PayloadFailed(describe_failure(cmd, proc.returncode))

    def _criu_payload(self, cmd: list[str], env: dict[str, str]) -> list[str]:
        """A ``criu dump`` of tasks we froze must be told their freezer cgroup, or
        it hangs trying to interrupt them; its image directory goes in the manifest."""
        group = getattr(self.freezer, "criu_freeze_cgroup", None)
        if group:
            env["SNAPCORE_FREEZE_CGROUP"] = str(group)
        if os.path.basename(cmd[0]) != "criu" or "dump" not in cmd[1:]:
            return cmd
        images = None
        for i, arg in enumerate(cmd):
            if arg in ("-D", "--images-dir") and i + 1 < len(cmd):
                images = cmd[i + 1]
            elif arg.startswith("--images-dir="):
                images = arg.split("=", 1)[1]
        if group and not any(a == "--freeze-cgroup" or a.startswith("--freeze-cgroup=") for a in cmd):
            cmd = [*cmd, "--freeze-cgroup", str(group)]
        self.manifest.criu = {"images_dir": os.path.abspath(images) if images else None, "argv": cmd}
        return cmd

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self.manifest.error = _describe(exc)
        if self.cancel.is_set() and not isinstance(exc, Cancelled):
            # what the cancellation broke (tar killed by the same SIGTERM, say)
            self.manifest.error = f"cancelled ({self.cancel.reason}): {_describe(exc)}"
        self.manifest.outcome = Outcome.FAILED.value
        thaw_error = self._thaw_all()  # already done by the window; harmless again
        if thaw_error is not None:
            self.manifest.warnings.append(f"thaw failed during cleanup: {_describe(thaw_error)}")
        self.watchdog.disarm()
        self._after_thaw()
        try:
            self._thaw_tasks()
        except Exception as exc:
            self.manifest.warnings.append(f"thawing the tasks failed: {_describe(exc)}")
        t = time.perf_counter()
        for run in reversed(self.runs):
            self._discard(run)
            if run.record.outcome != Outcome.SKIPPED.value:
                run.record.outcome = Outcome.FAILED.value
        drop_ghosts(self.manifest, self.state_dir)
        self._phase(Phase.DISCARD, t)

    def _discard(self, run: TargetRun) -> None:
        if run.export is not None and run.target.exporter:
            try:
                self.plugins.discard(run.target.exporter, run.target, run.image, run.export)
            except Exception as exc:
                run.record.warnings.append(f"discarding the export failed: {_describe(exc)}")
            else:
                self.journal.record("export-discarded", key=run.mount_point)
            run.export = None
        if run.image is not None:
            try:
                self.plugins.discard(run.target.imager, run.target, run.image, None)
            except Exception as exc:
                run.record.warnings.append(f"discarding the image failed: {_describe(exc)}")
            else:
                self.journal.record("discarded", key=run.mount_point)
            run.image = None

    def _close(self) -> None:
        if self.freezer is not None or self.watch is not None:
            self._thaw_tasks()
        self._pool = None  # the shared pool stays, idle, for the next checkpoint
        if self._failure is None:
            self.manifest.outcome = Outcome.OK.value
        self.manifest.finished = utc_now()
        self.manifest.timings["total"] = round((time.perf_counter() - self._t0) * 1000, 3)
        t = time.perf_counter()
        written = False
        try:
            inject("manifest")
            self.manifest.write(self.state_dir)
            written = True
        except Exception as exc:
            log.error("cannot write the manifest to %s: %s", self.state_dir, _describe(exc))
            if self._failure is None:
                self._failure = SnapcoreError(f"cannot write the manifest under {self.state_dir}: {_describe(exc)}")
                self.manifest.outcome = Outcome.FAILED.value
                self.manifest.error = str(self._failure)
            # an image without a manifest is a half-made checkpoint: undo it
            for run in reversed(self.runs):
                self._discard(run)
                if run.record.outcome == Outcome.OK.value:
                    run.record.outcome = Outcome.FAILED.value
        self._phase(Phase.MANIFEST, t)
        if written:  # nothing is left for a recovery to do
            self.journal.close(self.manifest.outcome)
        else:  # the journal stays: 'snapcore recover' will write the failed manifest
            self.journal.detach()
        self.watchdog.stop()
        for lock in self.locks:
            lock.release()
        self.locks.clear()
        if self.info is not None:
            try:
                self.plugins.checkpoint_end(self.info, Outcome(self.manifest.outcome), self.manifest)
            except Exception as exc:
                log.warning("checkpoint_end raised %s", _describe(exc))


_POOL: ThreadPoolExecutor | None = None
_POOL_WIDTH = 0
_POOL_LOCK = threading.Lock()


def _shared_pool(width: int) -> ThreadPoolExecutor:
    """One pool per process, its threads all started before any window: starting 16
    threads costs ~10 ms, paid once per process rather than once per checkpoint."""
    global _POOL, _POOL_WIDTH
    with _POOL_LOCK:
        if _POOL is None or width > _POOL_WIDTH:
            if _POOL is not None:
                _POOL.shutdown(wait=True)
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=width, thread_name_prefix="snapcore")
            _POOL_WIDTH = width
            barrier = threading.Barrier(width)
            for future in [_POOL.submit(barrier.wait, 5.0) for _ in range(width)]:
                future.result()
        return _POOL


def check_payload(payload: Payload | None) -> None:
    """Refuse a command that cannot run, before anything is frozen."""
    if payload is None or callable(payload):
        return
    argv = list(payload)
    if not argv:
        raise UsageError("empty command after '--'")
    import shutil

    if shutil.which(argv[0]) is None:
        raise UsageError(f"command not found: {argv[0]}")


__all__ = [
    "PayloadFailed",
    "PluginError",
    "Selection",
    "Transaction",
    "check_payload",
    "plan",
    "select",
]
