"""The tasks of a checkpoint (DESIGN steps 1, 5 and 8): held still around the
filesystems' freeze, their needed files watched, what changed under them judged."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from snapcore.errors import ChangeDetected, SnapcoreError
from snapcore.store.manifest import manifest_path
from snapcore.types import Rescue, RescueKind

if TYPE_CHECKING:
    from snapcore.policy.model import Rule
    from snapcore.tasks.changes import ChangeWatch
    from snapcore.tasks.freezer import TaskFreezer
    from snapcore.tasks.inventory import Inventory
    from snapcore.tasks.openhold import OpenHold
    from snapcore.tasks.resolve import TaskSet
    from snapcore.transaction.core import Transaction
    from snapcore.transaction.targets import TaskSpec

#: How long a checkpoint whose payload was ``criu dump`` waits for the dumped tasks'
#: PIDs to be free (PID 1 reaps them; 1-2 s were seen on a loaded machine).
DUMPED_TASKS_GONE_S = 10.0


class Held(Protocol):
    """Tasks kept stopped past a checkpoint's end for a hand-off."""

    def thaw(self) -> None: ...

    def end(self) -> None: ...

    def close(self) -> None: ...

    def to_json(self) -> dict[str, Any]: ...


class HeldByCriu:
    """Tasks a runtime's CRIU holds stopped while its post-dump action waits for
    snapcore (``checkpoint --container ... --hand-off``): what the action answers
    decides. *ok*: the dump has no ``--leave-running``, so CRIU ends them; an error:
    CRIU fails the dump and resumes them. There is nothing to thaw or kill here: if
    snapcore dies, the relay's pipe closes, the action fails, and CRIU resumes them."""

    def __init__(self, tasks: dict[str, Any] | None) -> None:
        self.tasks = dict(tasks or {})

    def thaw(self) -> None:
        """CRIU resumes them once the action answers an error."""

    def end(self) -> None:
        """CRIU ends them once the action answers *ok*."""

    def close(self) -> None:
        """Nothing of snapcore's holds them."""

    def to_json(self) -> dict[str, Any]:
        return self.tasks


class HeldTasks:
    """The checkpoint's tasks: frozen by snapcore (``--pid``, ``--cgroup``) or held
    stopped by someone else (CRIU, before its post-dump action script)."""

    def __init__(self, txn: Transaction, spec: TaskSpec, taskset: TaskSet, inventory: Inventory) -> None:
        self.txn = txn
        self.spec = spec
        self.taskset = taskset
        self.inventory = inventory
        self.freezer: TaskFreezer | None = None
        self.watch: ChangeWatch | None = None
        #: Write opens of needed files held back or refused (``on_change: delay|deny``).
        self.hold: OpenHold | None = None
        #: when they stopped (``time.monotonic()``), None while they run
        self.stopped_at: float | None = None
        self.rescues: dict[str, Rescue] = {}
        #: The wall clock at that moment (a hand-off's downtime ends on another host's).
        self.stopped_wall: float | None = None
        #: Frozen past the checkpoint's end, for a hand-off (:meth:`hand_over`).
        self.kept: Held | None = None

    @property
    def criu_freeze_cgroup(self) -> str | None:
        return self.freezer.criu_freeze_cgroup if self.freezer is not None else None

    def _labelled(self, record: dict[str, Any]) -> dict[str, Any]:
        """The manifest's ``tasks`` record, with the container they are (if any)."""
        if self.spec.container:
            record["container"] = self.spec.container
        return record

    def prepare(self) -> dict[str, Rescue]:
        """Ready the freeze (move the tasks into the cgroups they will be frozen in:
        an RCU wait, outside the window) and start watching what they need. Returns
        what the guard must write to thaw them if we die. Undo: :meth:`release`."""
        txn, spec = self.txn, self.spec
        if spec.stopped_by is None:
            from snapcore.tasks.freezer import TaskFreezer

            txn.journal.record("tasks", name=txn.id)
            self.freezer = TaskFreezer(self.taskset, name=txn.id)
            self.freezer.attach()
            self.rescues = {
                f"tasks:{path}": Rescue(kind=RescueKind.WRITE, path=path, value=value)
                for path, value in self.freezer.rescues()
            }
        else:
            txn.manifest.tasks = {**self.taskset.to_json(), "method": f"stopped by {spec.stopped_by}"}
            self.stopped_at = time.monotonic()
            self.stopped_wall = time.time()
        if txn.manifest.tasks is not None:
            txn.manifest.tasks = self._labelled(txn.manifest.tasks)
        if spec.criu_images:
            txn.manifest.criu = {"images_dir": spec.criu_images, "via": spec.criu_via}
        from snapcore.tasks.changes import ChangeWatch

        self.watch = ChangeWatch(self.inventory)
        self.watch.start()
        if spec.stopped_by is not None and self._start_hold(tell_guard=False):
            # stopped already (CRIU, before its post-dump hook): held from now on, not
            # only after the digests; the guard gets it with the other rescues, next
            assert self.hold is not None
            self.hold.engage(self.hold.until)
        # what the tasks' files hold, hashed now that a change would be seen
        from snapcore.tasks.digests import digest_files

        t = time.perf_counter()
        # a move: the destination's own files on the other mounts are checked by content too
        mounts = None if txn.send_images else [r.mount_point for r in txn.active]
        self.inventory = digest_files(self.inventory, txn.policy.digest_limit, mounts)
        txn.manifest.timings["digests"] = round((time.perf_counter() - t) * 1000, 3)
        return self.rescues

    def _rule_of(self, mount_point: str | None) -> Rule | None:
        policy = self.txn.policy
        return policy.rule_for(mount_point) if mount_point else policy.fallback

    def _start_hold(self, *, tell_guard: bool = True) -> bool:
        """``on_change: delay|deny``: right before the tasks stop, mark the needed
        regular files of those mounts and hand the guard copies of the groups with
        the hold's end (``freeze_timeout`` from now; ``tell_guard=False``: the
        caller's rescues carry it). Write opens are held from ``engage`` (the
        tasks' freeze) to the thaw. Returns whether a hold runs (started now or
        before)."""
        if self.hold is not None:
            return True
        from snapcore.tasks.openhold import HoldFile, HoldMode, OpenHold

        files: list[HoldFile] = []
        limit: float | None = None
        for f in self.inventory.files:
            rule = self._rule_of(f.mount_point)
            if f.kind != "file" or rule is None or rule.on_change not in (HoldMode.DELAY, HoldMode.DENY):
                continue
            files.append(HoldFile(path=f.path, dev=f.dev, ino=f.ino, via=f.via, mode=HoldMode(rule.on_change)))
            limit = min(limit, rule.freeze_timeout) if limit is not None else rule.freeze_timeout
        if not files or limit is None:
            return False
        txn = self.txn
        t = time.perf_counter()
        keep = self.watch.descriptors() if self.watch is not None else []
        hold = OpenHold(files, limit_s=limit, keep=keep)
        hold.start()
        txn.manifest.warnings.extend(hold.warnings)
        if hold.descriptor is None:
            return False
        self.hold = hold
        txn.manifest.holds = []
        until = time.monotonic() + limit
        # the guard holds the watch's groups too (see snapcore.safety.guard)
        fds = (hold.descriptor, *keep)
        # value: whose descriptor numbers name the events read and not yet answered
        rescue = Rescue(kind=RescueKind.FANOTIFY, fds=fds, value=str(hold.answerer), until=until)
        self.rescues[self.hold_key] = rescue
        txn.journal.record("freeze", key=self.hold_key, rescue=rescue.to_json())
        if tell_guard:
            txn.watchdog.watch({self.hold_key: rescue})
        hold.until = until
        txn.manifest.timings["hold_start"] = round((time.perf_counter() - t) * 1000, 3)
        return True

    @property
    def hold_key(self) -> str:
        return f"hold:{self.txn.id}"

    def _let_go(self, hold: OpenHold) -> None:
        """After the thaw: every held open allowed; what was held goes in the manifest."""
        txn = self.txn
        t = time.perf_counter()
        held = hold.release()
        txn.manifest.timings["hold_release"] = round((time.perf_counter() - t) * 1000, 3)
        self._said_thawed(hold=True)
        txn.manifest.holds = [h.to_json() for h in held]
        txn.manifest.warnings.extend(w for w in hold.warnings if w not in txn.manifest.warnings)
        if hold.failure:
            txn.manifest.warnings.append(f"the open hold turned itself off ({hold.failure}): every open allowed since")

    def rehearse(self) -> None:
        """Start and stop a watch of what the tasks need now (:meth:`Transaction.rehearse`)."""
        from snapcore.tasks.changes import ChangeWatch

        watch = ChangeWatch(self.inventory)
        watch.start()
        watch.stop()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """DESIGN step 5: stop the tasks, copy what only they still hold (files
        deleted or renamed over); on leaving, thaw them, whatever happened."""
        try:
            self._freeze()
            yield
        except BaseException:
            self.release()
            raise
        self.release(keep_frozen=self.txn.hand_off is not None)

    def _freeze(self) -> None:
        txn = self.txn
        self._start_hold()
        if self.freezer is not None:
            keys = [key for key in self.rescues if key != self.hold_key]
            txn.journal.record_many(
                [{"op": "freeze", "key": key, "rescue": self.rescues[key].to_json()} for key in keys]
            )
            if keys:
                txn.watchdog.freezing(*keys)
            t = time.perf_counter()
            self.freezer.freeze()
            if self.hold is not None:
                self.hold.engage(self.hold.until)
            if self.watch is not None:
                # a task's write queues its event before the task can freeze, but the
                # watch stamps an event when it reads it: read what the tasks wrote
                # before they stopped now, so that it is not taken for a change after
                # (a busy machine's reader thread ran late: a false "changed" was seen)
                self.watch.drain()
            self.stopped_at = time.monotonic()
            self.stopped_wall = time.time()
            txn.manifest.timings["tasks_freeze"] = round((time.perf_counter() - t) * 1000, 3)
        from snapcore.tasks.digests import at_freeze

        self.inventory = at_freeze(self.inventory)  # as they are now that the tasks stand still
        if self.inventory.ghosts_needed:
            from snapcore.tasks.inventory import copy_ghosts

            self.inventory = copy_ghosts(self.inventory, self._ghosts_dir(), limit=txn.policy.ghost_limit)
        txn.manifest.files = self.inventory.to_json()

    def release(self, *, keep_frozen: bool = False) -> None:
        """Stop watching and thaw the tasks (idempotent): the one place they thaw.
        ``keep_frozen`` (a hand-off): stop watching, and keep them frozen in
        :attr:`kept` for :meth:`hand_over`, the guard still armed."""
        txn = self.txn
        freezer, self.freezer = self.freezer, None
        watch, self.watch = self.watch, None
        hold, self.hold = self.hold, None
        if keep_frozen and freezer is not None:
            self.kept = freezer
            freezer = None
            txn.manifest.tasks = self._labelled(self.kept.to_json())
        elif keep_frozen and self.spec.stopped_by == "CRIU":
            self.kept = HeldByCriu(txn.manifest.tasks)
        try:
            if watch is not None:
                watch.stop()
        finally:
            try:
                self._thaw(freezer)
            finally:
                if hold is not None:  # after the thaw: a held write lands under running tasks
                    self._let_go(hold)

    def _thaw(self, freezer: TaskFreezer | None) -> None:
        """Thaw the tasks (when snapcore froze them) and say how long they stood still."""
        txn = self.txn
        stopped = txn.manifest.tasks
        if freezer is None and self.stopped_at is not None and stopped is not None and "stopped_ms" not in stopped:
            # stopped by CRIU before its post-dump hook: snapcore's share of the stop
            stopped["stopped_ms"] = round((time.monotonic() - self.stopped_at) * 1000, 3)
            stopped["stopped_note"] = "from the post-dump hook on; CRIU stopped them before"
        if freezer is not None:
            t = time.perf_counter()
            freezer.close()
            txn.manifest.timings["tasks_thaw"] = round((time.perf_counter() - t) * 1000, 3)
            txn.manifest.tasks = self._labelled(freezer.to_json())
            if self.stopped_at is not None:
                # how long the program stood still: frozen until thawed (or ended by a CRIU dump)
                txn.manifest.tasks["stopped_ms"] = round((time.monotonic() - self.stopped_at) * 1000, 3)
            self._said_thawed()

    def _said_thawed(self, *, hold: bool = False) -> None:
        """The journal and the guard learn that the tasks are thawed (``hold``: that
        the open hold has ended)."""
        keys = [key for key in self.rescues if (key == self.hold_key) == hold]
        self.txn.journal.record_many([{"op": "thawed", "key": key} for key in keys])
        if keys:
            with contextlib.suppress(SnapcoreError):
                self.txn.watchdog.thawed(*keys)

    def announce_hand_off(self) -> None:
        """Before the export's manifest copy is published (the destination starts
        from it): a complete checkpoint whose tasks are kept for a hand-off is one a
        controller that dies from now on leaves as it is ('recover' thaws the tasks,
        never discards what the destination may be restoring from)."""
        if self.kept is not None and self.txn.hand_off is not None and self.txn.manifest.outcome == "ok":
            self.txn.journal.record("handoff")

    def hand_over(self) -> None:
        """After the checkpoint (its manifest written and published): the tasks kept
        frozen for a hand-off are ended if the destination restored them, else
        thawed; never left frozen. Nothing kept (the checkpoint failed, they were
        thawed with it): nothing to do."""
        kept, self.kept = self.kept, None
        if kept is None:
            return
        txn = self.txn
        hand_off = txn.hand_off if txn.manifest.outcome == "ok" else None
        since = time.monotonic()
        ended, answer = False, None
        try:
            if hand_off is not None:
                ended, answer = hand_off.decide(kept)
        finally:
            try:
                kept.close()  # thawed: ended tasks die, the others run on
            except SnapcoreError as exc:  # the checkpoint is complete: said, not raised
                txn.manifest.warnings.append(f"after the hand-off: {exc}")
            finally:
                if hand_off is not None:
                    txn.watchdog.disarm()
                self._said_thawed()
                if hand_off is not None:
                    hand_off.record(ended, answer, since)

    def _ghosts_dir(self) -> Any:
        return manifest_path(self.txn.state_dir, self.txn.id).parent / "ghosts"

    def check_changes(self) -> None:
        """DESIGN step 8: what changed under the frozen tasks decides (``on_change``):
        a warning, or :class:`ChangeDetected`. Files renamed over or deleted meanwhile
        get their old content copied through the tasks' descriptors."""
        if self.watch is None:
            return
        from snapcore.tasks.changes import ChangeKind, apply_changes
        from snapcore.tasks.inventory import FileState, copy_ghosts

        txn = self.txn
        nameless = {
            (f.dev, f.ino) for f in self.inventory.files if f.state in (FileState.DELETED, FileState.RENAMED_OVER)
        }
        changes = tuple(
            c
            for c in self.watch.results(since=self.stopped_at)
            # a file that had no name left is released when its last holder closes it
            # (CRIU ends the dumped tasks): that is no change to what was checkpointed
            if not (c.kind is ChangeKind.DELETE and (c.dev, c.ino) in nameless)
        )
        txn.manifest.changes = [c.to_json() for c in changes]
        self.inventory = apply_changes(self.inventory, changes)
        from snapcore.tasks.digests import forget_changed

        self.inventory = forget_changed(
            self.inventory, [(c.dev, c.ino) for c in changes if c.dev is not None and c.ino is not None]
        )
        late = [f for f in self.inventory.ghosts_needed if f.ghost is None]
        if late:
            # renamed over or deleted while the tasks were stopped: their old content
            # is still reachable through the tasks' descriptors (unless a CRIU dump
            # ended them: then the ghost says why it is missing)
            spent = sum(f.ghost.size for f in self.inventory.files if f.ghost is not None and f.ghost.path)
            left = max(0, txn.policy.ghost_limit - spent)
            self.inventory = copy_ghosts(self.inventory, self._ghosts_dir(), limit=left, files=late)
        txn.manifest.files = self.inventory.to_json()
        mount_of = {(f.dev, f.ino): f.mount_point for f in self.inventory.files}
        fatal = []
        for change in changes:
            known = change.dev is not None and change.ino is not None
            mount_point = mount_of.get((change.dev, change.ino)) if known else None  # type: ignore[arg-type]
            rule = txn.policy.rule_for(mount_point) if mount_point else txn.policy.fallback
            message = f"{change.path}: {change.kind} after the tasks were frozen"
            if rule is not None and rule.on_change == "warn":
                txn.manifest.warnings.append(message)
            else:
                fatal.append(message)
        if fatal:
            raise ChangeDetected("a file the tasks need changed: " + "; ".join(fatal))

    def wait_for_dumped(self) -> None:
        """``criu dump`` (without ``--leave-running``/``--leave-stopped``) ends the
        tasks, but their PIDs stay taken until they are reaped, and ``criu restore``
        needs those very PIDs: the command returns once they are free, so that a
        restore right after it works."""
        txn = self.txn
        argv = (txn.manifest.criu or {}).get("argv")
        if (
            self.kept is not None
            or not argv
            or any(a in ("-R", "--leave-running", "-s", "--leave-stopped") for a in argv)
        ):
            return
        from snapcore.tasks.resolve import wait_pids_free

        t = time.perf_counter()
        held = wait_pids_free(self.taskset.pids, DUMPED_TASKS_GONE_S)
        txn.manifest.timings["dumped_tasks_gone"] = round((time.perf_counter() - t) * 1000, 3)
        if held:
            txn.manifest.warnings.append(
                f"the dumped tasks' PIDs are still taken ({', '.join(str(h) for h in held)}): "
                "'criu restore' fails with 'File exists' until they are free"
            )
