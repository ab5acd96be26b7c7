"""Tasks: freeze and thaw them (resolved by :mod:`snapcore.tasks.resolve`).

One module of ~540 lines because it is one thing: the life of the temporary freezer
cgroups — made, joined, frozen, judged frozen, thawed, emptied and removed, and found
again by ``recover`` — whose invariants (a task is moved back before its cgroup goes;
nothing is removed that is not ours) hold only if read in one place.

How a ``--pid`` tree is stopped: a temporary freezer cgroup, not ptrace
-----------------------------------------------------------------------------
A process tree usually shares its cgroup with others (a shell's child, a service's
worker, the test runner itself), so freezing its cgroup would stop strangers. Two
ways stop exactly the tree; snapcore moves the tree into a **temporary child cgroup
of each cgroup it lives in** (``<cgroup>/snapcore-NAME``), freezes that (cgroup v2
``cgroup.freeze`` and ``frozen 1`` in ``cgroup.events``, else the v1 freezer's
``freezer.state``), and moves the tasks back and removes the cgroup after the thaw.
Stopping the tasks the way CRIU does (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``) was
rejected because:

* a task has at most one tracer: while snapcore holds the tree traced, the payload
  ``criu dump -t PID`` cannot seize it; a cgroup-frozen tree is dumped by CRIU when
  it is told the cgroup (``--freeze-cgroup``, see :attr:`TaskFreezer.criu_freeze_cgroup`):
  it finds it frozen, seizes the tasks and leaves it frozen as it found it (tested
  in ``tests/test_criu.py``);
* a tracer that dies takes its stop with it silently, while a frozen cgroup stays
  frozen and is found again by :func:`recover_temporary_cgroups` (``snapcore
  recover``); the freeze is one write for the whole tree instead of one syscall
  and one ``waitpid`` per thread, and new children are born frozen in the cgroup;
* neither notifies the parent: a cgroup-frozen task is not in a job-control stop,
  so its parent gets no ``SIGCHLD``/``CLD_STOPPED`` and ``waitpid(WUNTRACED)``
  reports nothing (SIGSTOP would; tested).

The temporary cgroup is a child of the task's own cgroup, so the task stays under
every memory, CPU and pids limit it had. Moving a task costs a few µs, but the
first move into a new cgroup waits for an RCU grace period (~10-20 ms for 200
tasks): do :meth:`TaskFreezer.attach` before the freeze window; only
:meth:`~TaskFreezer.freeze`/:meth:`~TaskFreezer.thaw` belong inside it.

CRIU notes (measured with CRIU 4.1.1 on Linux 6.18): without ``--freeze-cgroup``,
``criu dump`` of a v2-frozen task hangs in ``wait4`` (its ``PTRACE_INTERRUPT`` does
not take a task out of the freezer); with it, dump works. While the tree sits in
``…/snapcore-NAME`` CRIU records that cgroup in its images, so restore with
``--manage-cgroups=ignore`` (the restored tree lands in the restoring CRIU's
cgroup) or CRIU recreates ``snapcore-NAME`` and leaves it behind.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import select
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapcore.errors import NoSuchTask, TaskError, UsageError
from snapcore.host.mounts import MOUNTINFO
from snapcore.tasks.cgroups import CgroupHierarchy, FreezeMethod, cgroup_hierarchies, task_cgroup
from snapcore.tasks.resolve import TaskSet, ancestors_of_self, cgroup_procs, check_alive, descendants, stat_fields

log = logging.getLogger(__name__)

#: Name prefix of the temporary cgroups (so ``recover`` can find leftovers).
TEMP_PREFIX = "snapcore-"

_counter = itertools.count(1)


# -- freezing ----------------------------------------------------------------------


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _permission(exc: OSError, what: str) -> UsageError:
    return UsageError(f"{what}: permission denied ({exc.strerror}); freezing tasks needs root")


@dataclass(slots=True)
class _Group:
    """One cgroup snapcore freezes: a temporary one, or the ``--cgroup`` itself."""

    directory: str
    version: int
    #: For a temporary cgroup: where its tasks go back to (its parent).
    home: str | None = None
    #: It was already frozen by someone else: never thaw it.
    was_frozen: bool = False
    frozen: bool = False


@dataclass(slots=True)
class _State:
    moved: dict[int, str] = field(default_factory=dict)  # pid -> home cgroup dir
    groups: dict[str, _Group] = field(default_factory=dict)  # home dir (or cgroup dir) -> group
    #: Every pid moved and temporary cgroup made, kept after :meth:`TaskFreezer.detach`
    #: empties the two above: the manifest reports what was held, after the thaw.
    held: dict[int, None] = field(default_factory=dict)
    made: dict[str, None] = field(default_factory=dict)


class TaskFreezer:
    """Freeze and thaw a :class:`TaskSet`, always leaving the tasks running.

    Use as a context manager (``with TaskFreezer(tasks) as f:`` attaches, freezes,
    and on exit thaws and detaches, even on failure), or step by step:
    :meth:`attach` (outside the freeze window: temporary cgroups, tasks moved in, still
    running), :meth:`freeze`, :meth:`thaw`, :meth:`detach` (tasks moved back,
    temporary cgroups removed); :meth:`close` does whatever of thaw/detach is due.

    Args:
        tasks: from :func:`resolve_pid` or :func:`resolve_cgroup`.
        timeout: seconds to wait for the kernel to report the tasks frozen; on expiry
            they are thawed and :class:`TaskError` names the tasks still running.
        name: suffix of the temporary cgroups (the checkpoint id); unique by default.
        prefer_v1: use the v1 freezer for a ``--pid`` tree even where cgroup2 is mounted.
    """

    def __init__(
        self,
        tasks: TaskSet,
        *,
        timeout: float = 5.0,
        name: str | None = None,
        prefer_v1: bool = False,
        mountinfo: str = MOUNTINFO,
    ) -> None:
        self.tasks = tasks
        self.timeout = timeout
        self.name = TEMP_PREFIX + (name or f"{os.getpid()}-{next(_counter)}")
        v2, v1 = cgroup_hierarchies(mountinfo)
        self.hierarchy: CgroupHierarchy
        if tasks.cgroup is not None:
            self.method = FreezeMethod.CGROUP2 if tasks.cgroup_version == 2 else FreezeMethod.CGROUP1
            hierarchy = v2 if tasks.cgroup_version == 2 else v1
        elif v2 is not None and not (prefer_v1 and v1 is not None) and _v2_can_freeze(v2):
            self.method, hierarchy = FreezeMethod.CGROUP2_TEMPORARY, v2
        else:
            self.method, hierarchy = FreezeMethod.CGROUP1_TEMPORARY, v1
        if hierarchy is None:
            raise TaskError("cannot freeze tasks: neither cgroup2 (with cgroup.freeze) nor the v1 freezer is mounted")
        self.hierarchy = hierarchy
        self._state = _State()
        self.attached = False
        self.frozen = False
        #: Wall time of the last freeze and thaw, in milliseconds.
        self.freeze_ms: float | None = None
        self.thaw_ms: float | None = None

    # -- description -------------------------------------------------------------

    @property
    def pids(self) -> tuple[int, ...]:
        """The tasks this freezer holds (moved ones for ``--pid``)."""
        if self.tasks.cgroup is not None:
            return self.tasks.pids
        return tuple(self._state.held)

    def rescues(self) -> list[tuple[str, str]]:
        """``(control file, value)`` that thaws each cgroup this freezer will freeze,
        for a process that outlives us (snapcore's guard). After :meth:`attach`; a
        ``--cgroup`` someone else already froze is left out (never thawed by us)."""
        result = []
        for group in self._state.groups.values():
            control = "cgroup.freeze" if group.version == 2 else "freezer.state"
            path = os.path.join(group.directory, control)
            if group.home is None:
                with contextlib.suppress(OSError):
                    if Path(path).read_text().strip() in ("1", "FROZEN"):
                        continue
            result.append((path, "0" if group.version == 2 else "THAWED"))
        return result

    @property
    def criu_freeze_cgroup(self) -> str | None:
        """The cgroup to pass as ``criu dump --freeze-cgroup`` (CRIU cannot seize a
        frozen task without it); None when the tasks span several cgroups."""
        dirs = [g.directory for g in self._state.groups.values()]
        return dirs[0] if len(dirs) == 1 else None

    def describe(self) -> str:
        """One line for the manifest: how the tasks were stopped."""
        if self.tasks.cgroup is not None:
            control = "cgroup.freeze" if self.method is FreezeMethod.CGROUP2 else "freezer.state"
            return f"{self.method.value}: {control} of {self.tasks.cgroup}"
        control = "cgroup.freeze" if self.method is FreezeMethod.CGROUP2_TEMPORARY else "freezer.state"
        return (
            f"{self.method.value}: {len(self._state.held)} task(s) of pid {self.tasks.root_pid} moved into "
            f"{len(self._state.made) or 1} temporary cgroup(s) {self.name} ({control}) and back"
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``tasks`` field."""
        data = self.tasks.to_json()
        data.update(
            method=self.method.value,
            how=self.describe(),
            pids=list(self.pids),
            temporary_cgroups=list(self._state.made),
            freeze_ms=self.freeze_ms,
            thaw_ms=self.thaw_ms,
        )
        return data

    # -- steps --------------------------------------------------------------------

    def attach(self) -> None:
        """Prepare to freeze; the tasks keep running. For ``--pid``: make the
        temporary cgroups and move the tree in (repeated until no new descendant
        appears). Raises :class:`NoSuchTask`, :class:`UsageError` (permission) or
        :class:`TaskError`; on failure whatever was moved is moved back."""
        if self.attached:
            return
        mine = ancestors_of_self()
        if self.tasks.cgroup is not None:
            own = task_cgroup(os.getpid(), self.hierarchy.version)
            own_dir = self.hierarchy.dir_of(own) if own is not None else None
            if own_dir is not None and (own_dir + "/").startswith(self.tasks.cgroup.rstrip("/") + "/"):
                raise UsageError(f"--cgroup {self.tasks.cgroup}: snapcore itself runs in it and cannot freeze itself")
            group = _Group(directory=self.tasks.cgroup, version=self.hierarchy.version)
            self._state.groups[self.tasks.cgroup] = group
            self.attached = True
            return
        root = self.tasks.root_pid
        assert root is not None
        try:
            self._move_tree(root, mine)
        except BaseException:
            self.detach()
            raise
        self.attached = True

    def _move_tree(self, root: int, mine: set[int]) -> None:
        check_alive(root)
        for _round in range(100):
            tree = descendants(root)
            if root not in self._state.moved and not os.path.exists(f"/proc/{root}"):
                raise NoSuchTask(f"--pid {root}: the process exited")
            new = [p for p in tree if p not in self._state.moved]
            if not new:
                return
            clash = mine.intersection(new)
            if clash:
                raise UsageError(
                    f"--pid {root}: the tree holds snapcore itself or its parent (pid {min(clash)}); "
                    "it cannot freeze itself"
                )
            for pid in new:
                self._move_in(pid, is_root=pid == root)
        raise TaskError(f"--pid {root}: the tree keeps forking new processes; cannot catch them all")

    def _move_in(self, pid: int, *, is_root: bool) -> None:
        cgroup = task_cgroup(pid, self.hierarchy.version)
        if cgroup is None:
            if is_root:
                raise NoSuchTask(f"--pid {pid}: the process exited")
            return
        home = self.hierarchy.dir_of(cgroup)
        if home is None:
            raise TaskError(f"pid {pid} is in cgroup {cgroup}, outside {self.hierarchy.mount_point}")
        if os.path.basename(home).startswith(TEMP_PREFIX):
            # born inside one of our cgroups (or a leftover of a crashed run)
            parent = os.path.dirname(home)
            if parent in self._state.groups:
                self._state.moved[pid] = parent
                self._state.held[pid] = None
                return
        group = self._state.groups.get(home)
        if group is None:
            directory = os.path.join(home, self.name)
            try:
                os.mkdir(directory)
            except FileExistsError:
                pass
            except PermissionError as exc:
                raise _permission(exc, f"cannot create cgroup {directory}") from None
            group = _Group(directory=directory, version=self.hierarchy.version, home=home)
            self._state.groups[home] = group
            self._state.made[directory] = None
        try:
            _write(os.path.join(group.directory, "cgroup.procs"), str(pid))
        except ProcessLookupError:
            if is_root:
                raise NoSuchTask(f"--pid {pid}: the process exited") from None
            return
        except PermissionError as exc:
            raise _permission(exc, f"cannot move pid {pid} into {group.directory}") from None
        except OSError as exc:
            raise TaskError(f"cannot move pid {pid} into {group.directory}: {exc.strerror}") from exc
        self._state.moved[pid] = home
        self._state.held[pid] = None

    def freeze(self) -> None:
        """Freeze every task and wait until the kernel says they are frozen.

        On failure (timeout, a task that cannot be moved) everything is thawed
        before :class:`TaskError` is raised."""
        if not self.attached:
            self.attach()
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        try:
            for group in self._state.groups.values():
                self._freeze_group(group)
            for group in self._state.groups.values():
                self._wait_frozen(group, deadline)
            self.frozen = True
            if self.tasks.root_pid is not None:
                # a child forked between the last scan and the freeze by a task not yet
                # moved: move it in now (it freezes on arrival) and wait again
                root = self.tasks.root_pid
                for _round in range(10):
                    new = [p for p in descendants(root) if p not in self._state.moved]
                    if not new:
                        break
                    for pid in new:
                        self._move_in(pid, is_root=False)
                    for group in self._state.groups.values():
                        self._freeze_group(group)
                        self._wait_frozen(group, deadline)
        except BaseException:
            self.thaw()
            raise
        self.freeze_ms = (time.perf_counter() - t0) * 1000
        log.debug("froze %d task(s) in %.3f ms (%s)", len(self.pids), self.freeze_ms, self.method.value)

    def _freeze_group(self, group: _Group) -> None:
        if group.frozen:
            return
        try:
            if group.version == 2:
                with open(os.path.join(group.directory, "cgroup.freeze"), encoding="ascii") as f:
                    group.was_frozen = group.home is None and f.read().strip() == "1"
                _write(os.path.join(group.directory, "cgroup.freeze"), "1")
            else:
                state = Path(group.directory, "freezer.state").read_text().strip()
                group.was_frozen = group.home is None and state == "FROZEN"
                _write(os.path.join(group.directory, "freezer.state"), "FROZEN")
        except PermissionError as exc:
            raise _permission(exc, f"cannot freeze {group.directory}") from None
        except FileNotFoundError as exc:
            raise TaskError(f"cannot freeze {group.directory}: the cgroup vanished") from exc
        group.frozen = True

    def _wait_frozen(self, group: _Group, deadline: float) -> None:
        if group.version == 2:
            events = os.path.join(group.directory, "cgroup.events")
            fd = os.open(events, os.O_RDONLY | os.O_CLOEXEC)
            try:
                poller = select.poll()
                poller.register(fd, select.POLLPRI)
                while b"frozen 1" not in os.pread(fd, 4096, 0):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TaskError(self._not_frozen_message(group))
                    # cgroup.events notifies by POLLPRI; the cap guards a missed wake-up
                    poller.poll(min(left, 0.01) * 1000)
            finally:
                os.close(fd)
            return
        state_file = os.path.join(group.directory, "freezer.state")
        delay = 0.0001
        while Path(state_file).read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                raise TaskError(self._not_frozen_message(group))
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def _not_frozen_message(self, group: _Group) -> str:
        stuck = []
        for pid in cgroup_procs(group.directory):
            fields = stat_fields(pid)
            if fields is not None:
                stuck.append(f"{pid} (state {fields[0]})")
        return (
            f"tasks not frozen after {self.timeout:g} s in {group.directory}: {', '.join(stuck[:10]) or '?'}; "
            "a task in state D waits on I/O (a frozen filesystem?) and cannot be frozen"
        )

    def thaw(self) -> None:
        """Thaw every cgroup this freezer froze (not one that was frozen before).
        Tries all of them; raises :class:`TaskError` afterwards if any failed."""
        t0 = time.perf_counter()
        problems: list[str] = []
        for group in reversed(list(self._state.groups.values())):
            if not group.frozen:
                continue
            if group.was_frozen:
                group.frozen = False
                continue
            try:
                if group.version == 2:
                    _write(os.path.join(group.directory, "cgroup.freeze"), "0")
                else:
                    _write(os.path.join(group.directory, "freezer.state"), "THAWED")
                group.frozen = False
            except FileNotFoundError:
                # removed, so empty: nothing in it is frozen (a runtime's checkpoint
                # ended the container and removed its cgroup: runc checkpoint)
                group.frozen = False
            except OSError as exc:
                problems.append(f"{group.directory}: {exc.strerror}")
        self.frozen = any(g.frozen for g in self._state.groups.values())
        self.thaw_ms = (time.perf_counter() - t0) * 1000
        if problems:
            raise TaskError("cannot thaw tasks, they may still be frozen: " + "; ".join(problems))

    def end(self) -> None:
        """SIGKILL every held task while it is still frozen: once thawed, each dies
        before it runs one more instruction (a fatal signal is taken on the way back
        to user space). For a hand-off whose destination restored the program."""
        import signal

        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.info("the destination restored the program: %d task(s) ended here", len(self.pids))

    def detach(self) -> None:
        """Move the tasks back to their own cgroups and remove the temporary ones
        (thaws first if needed). Raises :class:`TaskError` after trying everything."""
        problems: list[str] = []
        if self.frozen:
            try:
                self.thaw()
            except TaskError as exc:
                problems.append(str(exc))
        for pid, home in self._state.moved.items():
            try:
                _write(os.path.join(home, "cgroup.procs"), str(pid))
            except ProcessLookupError:
                pass
            except OSError as exc:
                problems.append(f"cannot move pid {pid} back to {home}: {exc.strerror}")
        for home, group in list(self._state.groups.items()):
            if group.home is None:
                continue
            try:
                _empty_and_remove(group.directory, home)
                del self._state.groups[home]
            except OSError as exc:
                problems.append(f"cannot remove {group.directory}: {exc.strerror}")
        if not problems:
            self._state.moved.clear()
        self.attached = False
        if problems:
            raise TaskError("; ".join(problems))

    def close(self) -> None:
        """Thaw and detach, whatever state the freezer is in (idempotent)."""
        problems: list[str] = []
        try:
            self.thaw()
        except TaskError as exc:
            problems.append(str(exc))
        try:
            self.detach()
        except TaskError as exc:
            problems.append(str(exc))
        if problems:
            raise TaskError("; ".join(problems))

    def __enter__(self) -> TaskFreezer:
        try:
            self.attach()
            self.freeze()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _v2_can_freeze(hierarchy: CgroupHierarchy) -> bool:
    """cgroup2 has a freezer (kernel ≥ 5.2): non-root cgroups have ``cgroup.freeze``."""
    mp = hierarchy.mount_point
    try:
        with os.scandir(mp) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    return os.path.exists(os.path.join(entry.path, "cgroup.freeze"))
    except OSError:
        return False
    # no child cgroup to look at: the cgroup2 freezer came with Linux 5.2
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (5, 2)
    except (IndexError, ValueError):
        return False


def _empty_and_remove(directory: str, home: str) -> None:
    """Move any task left in ``directory`` to ``home``, then rmdir it (retrying while
    exiting tasks linger)."""
    for attempt in range(50):
        try:
            pids = Path(directory, "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                _write(os.path.join(home, "cgroup.procs"), pid)
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == 49:
                raise
            time.sleep(0.002 * (attempt + 1))


@contextlib.contextmanager
def frozen(tasks: TaskSet, *, timeout: float = 5.0, name: str | None = None) -> Iterator[TaskFreezer]:
    """``with frozen(resolve_pid(pid)) as f:`` — the tasks are frozen in the body and
    thawed (and moved back) however it ends."""
    with TaskFreezer(tasks, timeout=timeout, name=name) as freezer:
        yield freezer


def recover_temporary_cgroups(
    mountinfo: str = MOUNTINFO, *, name: str | None = None, leave_frozen: bool = False
) -> list[str]:
    """Thaw and remove temporary cgroups a crashed snapcore left behind (``snapcore
    recover``); their tasks go back to the parent cgroup. Returns the paths handled.

    Also what follows a ``criu restore`` of a checkpoint whose tasks snapcore froze in
    temporary cgroups: CRIU puts the tasks back into the cgroups it dumped them from,
    which it re-makes (``HOME/snapcore-NAME``); they go back to ``HOME``, where they
    lived before the checkpoint.

    Args:
        name: only the cgroups of this checkpoint (``TaskFreezer(name=...)``).
        leave_frozen: leave a frozen one alone (a checkpoint of that name running now)
            instead of thawing it.
    """
    wanted = TEMP_PREFIX + name if name else None
    done: list[str] = []
    for hierarchy in cgroup_hierarchies(mountinfo):
        if hierarchy is None:
            continue
        control = "cgroup.freeze" if hierarchy.version == 2 else "freezer.state"
        thawed = "0" if hierarchy.version == 2 else "THAWED"
        for dirpath, dirnames, _files in os.walk(hierarchy.mount_point):
            for d in list(dirnames):
                if not d.startswith(TEMP_PREFIX) or (wanted is not None and d != wanted):
                    continue
                dirnames.remove(d)
                directory = os.path.join(dirpath, d)
                if leave_frozen:
                    with contextlib.suppress(OSError):
                        if Path(directory, control).read_text().strip() in ("1", "FROZEN", "FREEZING"):
                            continue
                else:
                    with contextlib.suppress(OSError):
                        _write(os.path.join(directory, control), thawed)
                with contextlib.suppress(OSError):
                    _empty_and_remove(directory, dirpath)
                    done.append(directory)
    return done
