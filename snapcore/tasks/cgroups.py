"""Where the cgroup hierarchies are mounted (read from ``/proc/self/mountinfo``:
hybrid hosts mount cgroup2 at ``/sys/fs/cgroup/unified``) and which cgroup a task is in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum

from snapcore.host.mounts import MOUNTINFO, read_mounts


class FreezeMethod(StrEnum):
    """How tasks were stopped: recorded in the manifest's ``tasks`` field."""

    #: ``--cgroup`` on cgroup v2: ``cgroup.freeze`` of that cgroup.
    CGROUP2 = "cgroup2-freeze"
    #: ``--cgroup`` on the v1 freezer: ``freezer.state`` of that cgroup.
    CGROUP1 = "cgroup1-freezer"
    #: ``--pid``: tree moved into temporary cgroup v2 children, frozen, moved back.
    CGROUP2_TEMPORARY = "cgroup2-freeze-temporary"
    #: ``--pid`` where only the v1 freezer is mounted.
    CGROUP1_TEMPORARY = "cgroup1-freezer-temporary"


# -- cgroup hierarchies --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CgroupHierarchy:
    """A mounted cgroup hierarchy: cgroup2, or the v1 one holding ``freezer``."""

    version: int
    mount_point: str
    #: The cgroup path mounted there (``/`` unless in a cgroup namespace or a bind).
    root: str

    def dir_of(self, cgroup: str) -> str | None:
        """Directory of cgroup path ``cgroup`` (as in ``/proc/PID/cgroup``), or None
        when it is outside this mount."""
        root = self.root.rstrip("/")
        if cgroup != root and not cgroup.startswith(root + "/"):
            return None
        rel = cgroup[len(root) :].lstrip("/")
        return os.path.join(self.mount_point, rel) if rel else self.mount_point

    def owns(self, path: str) -> bool:
        mp = self.mount_point.rstrip("/")
        return path == mp or path.startswith(mp + "/")


def cgroup_hierarchies(mountinfo: str = MOUNTINFO) -> tuple[CgroupHierarchy | None, CgroupHierarchy | None]:
    """``(cgroup2, v1 freezer)`` as mounted in this mount namespace (either may be None)."""
    v2: CgroupHierarchy | None = None
    v1: CgroupHierarchy | None = None
    for m in read_mounts(mountinfo):
        if m.fstype == "cgroup2" and v2 is None:
            v2 = CgroupHierarchy(version=2, mount_point=m.mount_point, root=m.root)
        elif m.fstype == "cgroup" and "freezer" in m.super_options and v1 is None:
            v1 = CgroupHierarchy(version=1, mount_point=m.mount_point, root=m.root)
    return v2, v1


def task_cgroup(pid: int, version: int) -> str | None:
    """The cgroup path of ``pid`` in the v2 hierarchy or the v1 freezer; None when
    the task is gone or not in that hierarchy."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if version == 2 and hid == "0" and controllers == "":
            return path
        if version == 1 and "freezer" in controllers.split(","):
            return path
    return None


def freezer_cgroup_of(pid: int, mountinfo: str = MOUNTINFO) -> str | None:
    """The directory of the cgroup a container runtime freezes ``pid`` in (its
    container's): the v1 freezer's where that hierarchy is mounted (runc and its CRIU
    freeze there on a host with both), else cgroup2's; None when there is none."""
    v2, v1 = cgroup_hierarchies(mountinfo)
    for hierarchy in (v1, v2):
        if hierarchy is not None:
            cgroup = task_cgroup(pid, hierarchy.version)
            directory = hierarchy.dir_of(cgroup) if cgroup is not None else None
            if directory is not None:
                return directory
    return None


# -- leaving a runtime's cgroups -------------------------------------------------------


def _cgroup_lines(pid: int | str) -> dict[tuple[str, str], str]:
    """``(hierarchy id, controllers)`` → cgroup path, from ``/proc/PID/cgroup``."""
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        found[(hid, controllers)] = path
    return found


def join_cgroups_of_caller(mountinfo: str = MOUNTINFO) -> str | None:
    """Move this process into the cgroups of the nearest ancestor that is in other
    cgroups than it (a runtime that put CRIU, and so CRIU's action script, into the
    container's cgroups: runc and podman do at restore). There the container's limits
    stop applying to what the hook does for the host: the v1 ``devices`` cgroup of a
    container refuses to mount a loop device (EPERM). Returns what was done (None when
    nothing was), or raises :class:`OSError` when a move is refused."""
    from snapcore.tasks.resolve import parent_of  # resolve imports this module

    ours = _cgroup_lines("self")
    pid = parent_of(os.getpid())
    while pid > 1:
        theirs = _cgroup_lines(pid)
        if theirs and theirs != ours:
            break
        pid = parent_of(pid)
    else:
        return None
    mounts = [m for m in read_mounts(mountinfo) if m.fstype in ("cgroup", "cgroup2")]
    moved = []
    for (hid, controllers), path in theirs.items():
        if ours.get((hid, controllers)) == path:
            continue
        wanted = set(filter(None, controllers.split(",")))
        for m in mounts:
            v2 = hid == "0" and not controllers
            if (v2 and m.fstype == "cgroup2") or (not v2 and m.fstype == "cgroup" and wanted <= set(m.super_options)):
                if m.root != "/" and not path.startswith(m.root.rstrip("/") + "/") and path != m.root:
                    continue
                rel = path[len(m.root.rstrip("/")) :] if m.root != "/" else path
                target = os.path.join(m.mount_point, rel.lstrip("/"), "cgroup.procs")
                with open(target, "w", encoding="ascii") as f:
                    f.write(str(os.getpid()))
                moved.append(f"{controllers or 'cgroup2'}:{path}")
                break
    from snapcore.tasks.holders import comm_of

    return f"joined the cgroups of pid {pid} ({comm_of(pid)}): {', '.join(moved)}" if moved else None
