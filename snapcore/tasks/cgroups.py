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
