"""Tasks: resolve ``--pid``/``--cgroup`` to processes, and watch their PIDs.

``--pid PID`` means the process and all its descendants (read from
``/proc/PID/task/*/children``, or by scanning ``/proc`` where that file is missing);
``--cgroup PATH`` means every process of a cgroup (v2, or the v1 freezer) and of its
descendants.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore.errors import NoSuchTask, NotACgroup
from snapcore.host.mounts import MOUNTINFO
from snapcore.tasks.cgroups import cgroup_hierarchies

log = logging.getLogger(__name__)


# -- resolving tasks ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSet:
    """The processes to checkpoint: a ``--pid`` tree or a ``--cgroup``."""

    pids: tuple[int, ...]
    #: The ``--pid`` given (the root of the tree), else None.
    root_pid: int | None = None
    #: The ``--cgroup`` directory given, else None.
    cgroup: str | None = None
    #: 2 or 1 (v1 freezer) for a ``--cgroup``.
    cgroup_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "root_pid": self.root_pid,
            "cgroup": self.cgroup,
            "cgroup_version": self.cgroup_version,
            "pids": list(self.pids),
        }


def stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rfind(b")") + 2 :].decode().split()


def parent_of(pid: int) -> int:
    """``pid``'s parent, 0 when it is gone."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else 0


def check_alive(pid: int) -> None:
    if pid <= 0:
        raise NoSuchTask(f"--pid {pid}: not a process id")
    fields = stat_fields(pid)
    if fields is None:
        raise NoSuchTask(f"--pid {pid}: no such process")
    if fields[0] in ("Z", "X"):
        raise NoSuchTask(f"--pid {pid}: the process is exiting (state {fields[0]})")


def _children(pid: int) -> list[int] | None:
    """Children of every thread of ``pid``; None when /proc has no children files."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread exited
            return None  # kernel without CONFIG_PROC_CHILDREN
    return out


def _children_by_scan() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(int(name))
            if fields is not None:
                tree.setdefault(int(fields[1]), []).append(int(name))
    return tree


def descendants(pid: int) -> list[int]:
    """``pid`` and all its living descendants, parents before children."""
    out = [pid]
    seen = {pid}
    scanned: dict[int, list[int]] | None = None
    i = 0
    while i < len(out):
        kids = _children(out[i]) if scanned is None else None
        if kids is None:
            if scanned is None:
                scanned = _children_by_scan()
            kids = scanned.get(out[i], [])
        for kid in kids:
            if kid not in seen:
                seen.add(kid)
                out.append(kid)
        i += 1
    return out


def resolve_pid(pid: int) -> TaskSet:
    """The process ``pid`` and all its descendants.

    Raises:
        NoSuchTask: ``pid`` does not exist or is exiting.
    """
    check_alive(pid)
    return TaskSet(pids=tuple(descendants(pid)), root_pid=pid)


def cgroup_procs(directory: str) -> list[int]:
    """PIDs in the cgroup at ``directory`` and in every cgroup below it."""
    pids: list[int] = []
    for dirpath, _dirs, files in os.walk(directory):
        if "cgroup.procs" in files:
            with contextlib.suppress(FileNotFoundError):
                pids.extend(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def resolve_cgroup(path: str | os.PathLike[str], *, mountinfo: str = MOUNTINFO) -> TaskSet:
    """Every process in the cgroup directory ``path`` and below it.

    Raises:
        NotACgroup: ``path`` is not a directory of a mounted cgroup2 hierarchy or of
            the v1 freezer, or it is a root cgroup (which cannot be frozen).
    """
    directory = os.path.realpath(path)
    v2, v1 = cgroup_hierarchies(mountinfo)
    for hierarchy, control in ((v2, "cgroup.freeze"), (v1, "freezer.state")):
        if hierarchy is None or not hierarchy.owns(directory):
            continue
        if not os.path.isdir(directory):
            raise NotACgroup(f"--cgroup {os.fspath(path)}: no such cgroup")
        if not os.path.exists(os.path.join(directory, control)):
            why = (
                "it is a root cgroup, which cannot be frozen"
                if os.path.realpath(directory) == os.path.realpath(hierarchy.mount_point)
                else f"it has no {control}"
            )
            raise NotACgroup(f"--cgroup {os.fspath(path)}: {why}")
        return TaskSet(
            pids=tuple(sorted(set(cgroup_procs(directory)))), cgroup=directory, cgroup_version=hierarchy.version
        )
    mounted = ", ".join(f"{h.mount_point} (v{h.version})" for h in (v2, v1) if h is not None) or "none"
    raise NotACgroup(
        f"--cgroup {os.fspath(path)}: not a cgroup; give a directory under a cgroup2 or v1 freezer mount "
        f"(mounted here: {mounted})"
    )


def ancestors_of_self() -> set[int]:
    """This process and its ancestors: freezing any of them would hang snapcore."""
    out = set()
    pid = os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        pid = parent_of(pid)
    return out


def live(pids: Iterable[int]) -> list[int]:
    """The PIDs of ``pids`` that still exist and are not zombies."""
    out = []
    for pid in pids:
        fields = stat_fields(pid)
        if fields is not None and fields[0] not in ("Z", "X"):
            out.append(pid)
    return out


@dataclass(frozen=True, slots=True)
class PidHolder:
    """A process that holds one of the PIDs a restore needs."""

    pid: int
    comm: str
    state: str
    ppid: int

    def __str__(self) -> str:
        if self.state == "Z":
            return f"pid {self.pid} (a zombie of pid {self.ppid}: its parent has not reaped it)"
        return f"pid {self.pid} ({self.comm})"


def pid_holders(pids: Iterable[int]) -> list[PidHolder]:
    """What holds each of ``pids`` now (zombies too: their PID is not free)."""
    out = []
    for pid in pids:
        fields = stat_fields(pid)
        if fields is None:
            continue
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        out.append(PidHolder(pid=pid, comm=comm, state=fields[0], ppid=int(fields[1])))
    return out


def wait_pids_free(
    pids: Iterable[int], timeout: float, *, ending: bool = True, interval: float = 0.02
) -> list[PidHolder]:
    """Wait until no process holds any of ``pids``, at most ``timeout`` seconds, and
    return what still holds them. ``ending``: the holders are tasks on their way out
    (CRIU ended them) and are waited for whatever their state; else a live holder is
    returned at once (it will not go by itself), and only zombies are waited for. A
    zombie is collected by its reaper (PID 1 takes a second or two on some
    machines); one whose parent is some other live process is that parent's to reap,
    whenever it chooses: not waited for past a short grace."""
    wanted = [p for p in pids if p > 0]
    start = time.monotonic()
    while True:
        held = pid_holders(wanted)
        if not held:
            return []
        waited = time.monotonic() - start
        if not ending and any(h.state not in ("Z", "X") for h in held):
            return held
        parents_job = all(h.state == "Z" and h.ppid not in (0, 1) for h in held)
        if waited >= timeout or (parents_job and waited >= min(0.5, timeout)):
            return held
        time.sleep(interval)
