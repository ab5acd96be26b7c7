"""Tasks in another mount namespace (a container): their mounts as the host sees them.

A descriptor's ``mnt_id`` (``/proc/PID/fdinfo``) names a mount of the task's own
mount namespace; a container's namespace is a copy of mounts with ids of its own,
absent from the host's table. ``/proc/PID/mountinfo`` lists that namespace, with
each mount's device and its root inside the filesystem, so each mount maps onto a
host mount of the same device whose root contains it: the container's rootfs
(a subvolume, a bind mount of a directory, the overlay a runtime mounted) and its
volumes are found on the host, and they are what is frozen and imaged.

What has no such host mount — a tmpfs private to the container, a filesystem
mounted only inside it — cannot be checkpointed from here: :meth:`NamespaceMounts.host_mount`
says so, and the inventory turns it into a warning that is always shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from snapcore.host.mounts import MountTable, is_pseudo, parse_mountinfo
from snapcore.types import Mount


def mount_namespace(pid: int | str) -> int | None:
    """The inode of ``pid``'s mount namespace (``/proc/PID/ns/mnt``), None if gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def _within(root: str, inner: str) -> str | None:
    """``inner`` relative to ``root`` (both roots inside a filesystem), or None when
    ``inner`` is not at or below ``root``."""
    if root == "/":
        return inner.lstrip("/")
    if inner == root:
        return ""
    if inner.startswith(root.rstrip("/") + "/"):
        return inner[len(root.rstrip("/")) + 1 :]
    return None


@dataclass(frozen=True, slots=True)
class Mapped:
    """A mount of a task's namespace and the host mount that shows the same files."""

    inner: Mount
    host: Mount
    #: the inner mount's root, relative to the host mount's root ("" when the same)
    offset: str

    def host_path(self, path: str) -> str | None:
        """Where the host sees ``path`` (as the task sees it, on this mount)."""
        below = _within(self.inner.mount_point, path)
        if below is None:
            return None
        parts = [p for p in (self.offset, below) if p]
        return os.path.join(self.host.mount_point, *parts) if parts else self.host.mount_point


class NamespaceMounts:
    """Maps the mount ids tasks report onto the host's mount table, whatever mount
    namespace each task is in (read once per namespace)."""

    def __init__(self, host: MountTable) -> None:
        self.host = host
        self.own = mount_namespace("self")
        self._tables: dict[int, dict[int, Mount]] = {}
        self._mapped: dict[tuple[int, int], Mapped | None] = {}

    def namespace_of(self, pid: int) -> int | None:
        """``pid``'s mount namespace when it is not this process's, else None."""
        ns = mount_namespace(pid)
        return None if ns is None or ns == self.own else ns

    def inner_mount(self, pid: int, ns: int, mnt_id: int) -> Mount | None:
        """The mount ``mnt_id`` of ``pid``'s namespace ``ns``, as that namespace lists it."""
        table = self._tables.get(ns)
        if table is None:
            try:
                with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
                    table = {m.mount_id: m for m in parse_mountinfo(f.read())}
            except (OSError, ValueError):
                table = {}
            self._tables[ns] = table
        return table.get(mnt_id)

    def mapped(self, ns: int, inner: Mount) -> Mapped | None:
        """The host mount of the same device whose root holds ``inner``'s root (the
        most specific one; the first in mount order among equals), or None."""
        key = (ns, inner.mount_id)
        if key in self._mapped:
            return self._mapped[key]
        best: Mapped | None = None
        for mount in self.host.mounts:
            if (mount.major, mount.minor) != (inner.major, inner.minor) or is_pseudo(mount):
                continue
            offset = _within(mount.root, inner.root)
            if offset is None:
                continue
            if best is None or len(mount.root) > len(best.host.root):
                best = Mapped(inner=inner, host=mount, offset=offset)
        self._mapped[key] = best
        return best

    @staticmethod
    def unmapped_reason(pid: int, inner: Mount) -> str:
        return (
            f"pid {pid}: {inner.mount_point} in its mount namespace ({inner.fstype} {inner.source}, "
            f"root {inner.root}) is on no mount the host has: its files are not checkpointed"
        )

    @staticmethod
    def is_pseudo(mount: Mount) -> bool:
        return is_pseudo(mount)


__all__ = ["Mapped", "NamespaceMounts", "mount_namespace"]
