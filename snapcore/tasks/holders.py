"""Who holds a mount: the processes (and mounts) that keep ``umount`` from working.

An in-place restore that swaps what a mount shows (a btrfs rollback) must unmount
it; when something holds it, the swap cannot take effect now, and a restored
program must not be started on the old tree. :func:`mount_holders` says what holds
it, the way ``fuser -vm`` does: each process with a descriptor, working directory,
root or mapped file on that very mount (by mount id, so a bind mount of the same
filesystem elsewhere does not count), and each mount stacked below it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from snapcore.errors import SnapcoreError
from snapcore.host.mounts import MountTable, mount_id_of
from snapcore.tasks.inventory import _fdinfo, _map_files_name, _mnt_id_of
from snapcore.tasks.mountns import mount_namespace
from snapcore.tasks.resolve import stat_fields

__all__ = ["Holder", "mount_holders"]


@dataclass(frozen=True, slots=True)
class Holder:
    """One process that uses a mount, or one mount stacked on it (``pid`` None)."""

    pid: int | None
    #: The command name (``/proc/PID/comm``), or the stacked mount's mount point.
    name: str
    #: How it uses the mount: ``cwd``, ``root``, ``fd 3 (/app/db)``, ``mapped /app/lib.so``.
    uses: tuple[str, ...]

    def __str__(self) -> str:
        if self.pid is None:
            if self.uses == ("bind",):
                return f"{self.name} shows the same tree (a bind mount)"
            return f"{self.name} is mounted below it"
        return f"pid {self.pid} ({self.name}: {', '.join(self.uses)})"


def mount_holders(mount_point: str, *, exclude: frozenset[int] = frozenset()) -> list[Holder]:
    """Every process (but ``exclude``) using the mount at ``mount_point``, and every
    mount stacked below it; empty when ``umount`` would succeed."""
    try:
        target = mount_id_of(mount_point)
    except SnapcoreError:  # gone: nothing holds it
        return []
    held: list[Holder] = []
    for mount in MountTable.read().mounts:
        if mount.parent_id == target and mount.mount_id != target:
            held.append(Holder(pid=None, name=mount.mount_point, uses=("mount",)))
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in exclude or _exiting(pid):
            continue
        uses = _uses(pid, target)
        if uses:
            held.append(Holder(pid=pid, name=comm_of(pid) + (" (snapcore itself)" if pid == me else ""), uses=uses))
    held += namespace_mounts(target, exclude=exclude)
    return held


#: ``PF_EXITING`` in ``/proc/PID/stat``'s flags: the task is in do_exit.
_PF_EXITING = 0x4


def _exiting(pid: int) -> bool:
    """A process on its way out (exiting, a zombie) holds nothing for long: the
    container a runtime just removed, whose last tasks are still being torn down."""
    fields = stat_fields(pid)
    try:
        return fields is None or fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)
    except (IndexError, ValueError):
        return True


def _optional_fields(line: str) -> set[str]:
    """A mountinfo line's optional fields (``shared:N``, ``master:N``...)."""
    fields = line.split()
    try:
        return set(fields[6 : fields.index("-", 6)])
    except ValueError:
        return set()


def namespace_mounts(target: int, *, exclude: frozenset[int] = frozenset()) -> list[Holder]:
    """Other mounts of our mount ``target``'s tree that will not follow a change of it:
    a bind mount of it elsewhere in this namespace (runc binds a container's rootfs
    for CRIU at ``/run/runc/ID/criu-root`` before a restore), and its mounts in other
    mount namespaces (a running container's) except copies that a change of ours
    reaches (propagation peers at the same mount point). An in-place restore that
    swapped ours would leave them on the old tree, and whatever runs there would
    start on it. In other namespaces, one holder per namespace, named by a process."""
    ours = next((line for line in _mountinfo_lines("self") if line.split(" ", 1)[0] == str(target)), None)
    if ours is None:
        return []
    mine = ours.split()
    device, root, where = mine[2], mine[3], mine[4]
    peers = {f.replace("master:", "shared:") for f in _optional_fields(ours) if f.startswith("shared:")}

    def same_tree(fields: list[str]) -> bool:
        their_root = fields[3]
        return (
            len(fields) > 4
            and fields[2] == device
            and (root == "/" or their_root == root or their_root.startswith(root.rstrip("/") + "/"))
        )

    held: list[Holder] = []
    for line in _mountinfo_lines("self"):
        fields = line.split()
        if fields and fields[0] != str(target) and same_tree(fields) and fields[4] != where:
            held.append(Holder(pid=None, name=fields[4], uses=("bind",)))
    own_ns = mount_namespace("self")
    if own_ns is None:
        return held
    seen: set[int] = {own_ns}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude or _exiting(int(name)):
            continue
        ns = mount_namespace(name)
        if ns is None or ns in seen:
            continue
        seen.add(ns)
        for line in _mountinfo_lines(name):
            fields = line.split()
            if not same_tree(fields):
                continue
            theirs = {f.replace("master:", "shared:") for f in _optional_fields(line)}
            if peers & theirs and fields[4] == where:
                continue  # its copy of our mount: our umount and mount reach it
            held.append(
                Holder(
                    pid=int(name),
                    name=comm_of(int(name)),
                    uses=(f"mounts it at {fields[4]} in its own mount namespace",),
                )
            )
            break
    return held


def _mountinfo_lines(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _uses(pid: int, target: int) -> tuple[str, ...]:
    base = f"/proc/{pid}"
    uses: list[str] = []
    for kind in ("cwd", "root"):
        if _mnt_id_of(f"{base}/{kind}") == target:
            uses.append(kind)
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            info = _fdinfo(f"{base}/fdinfo/{fd}")
        except OSError:  # not ours to read (another user namespace's process)
            continue
        if info is not None and info[2] == target:
            uses.append(f"fd {fd} ({_readlink(f'{base}/fd/{fd}')})")
    try:
        with open(f"{base}/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    seen: set[bytes] = set()
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[4] == b"0" or not parts[5].startswith(b"/") or parts[5] in seen:
            continue
        seen.add(parts[5])
        if _mnt_id_of(f"{base}/map_files/{_map_files_name(parts[0])}") == target:
            uses.append(f"mapped {os.fsdecode(parts[5])}")
    return tuple(uses)


def comm_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"
