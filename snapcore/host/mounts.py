"""Mounts: ``/proc/self/mountinfo`` parsed, paths resolved, devices found (pyudev).

A path's mount is taken from the kernel itself (the ``mnt_id`` of an ``O_PATH``
descriptor, from ``/proc/self/fdinfo``), so bind mounts, overmounted paths and
btrfs subvolumes resolve exactly as the kernel sees them.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from snapcore.errors import UnsupportedMount, UsageError
from snapcore.host.fsutil import block_devnum
from snapcore.types import Mount

MOUNTINFO = "/proc/self/mountinfo"

#: Filesystems that hold no files of their own: never a target.
PSEUDO_FILESYSTEMS = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nsfs",
        "pipefs",
        "proc",
        "pstore",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "sockfs",
        "sysfs",
        "tracefs",
        "devtmpfs",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` for a space, ``\\134`` for ``\\``)."""
    if "\\" not in field:
        return field
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_line(line: str) -> Mount:
    """Parse one line of mountinfo (see proc(5))."""
    fields = line.split()
    try:
        sep = fields.index("-", 6)
    except ValueError:
        raise ValueError(f"malformed mountinfo line: {line!r}") from None
    major, minor = fields[2].split(":")
    return Mount(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        major=int(major),
        minor=int(minor),
        root=unescape(fields[3]),
        mount_point=unescape(fields[4]),
        mount_options=tuple(fields[5].split(",")),
        fstype=fields[sep + 1],
        source=unescape(fields[sep + 2]) if len(fields) > sep + 2 else "none",
        super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
    )


def parse_mountinfo(text: str) -> list[Mount]:
    return [parse_mountinfo_line(line) for line in text.splitlines() if line.strip()]


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    """Every mount of this process's mount namespace, in mountinfo order."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mount_id_of(path: str | os.PathLike[str]) -> int:
    """The kernel's mount id for ``path`` (follows symlinks, like ``stat``)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{os.fspath(path)}: no such file or directory") from None
    except PermissionError:
        raise UsageError(f"{os.fspath(path)}: permission denied") from None
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    raise UsageError(f"{os.fspath(path)}: the kernel gives no mount id")  # pragma: no cover


class MountTable:
    """A snapshot of the mount table with lookups by path and by id."""

    def __init__(self, mounts: Sequence[Mount]) -> None:
        self.mounts = list(mounts)
        self.by_id = {m.mount_id: m for m in self.mounts}
        self._enriched: dict[int, Mount] = {}

    @classmethod
    def read(cls) -> MountTable:
        return cls(read_mounts())

    def _reload(self) -> None:
        self.mounts = read_mounts()
        self.by_id = {m.mount_id: m for m in self.mounts}

    def find(self, path: str | os.PathLike[str]) -> Mount:
        """The mount that holds ``path``, enriched with its device."""
        mnt_id = mount_id_of(path)
        mount = self.by_id.get(mnt_id)
        if mount is None:  # mounted after we read the table
            self._reload()
            mount = self.by_id.get(mnt_id)
        if mount is None:
            raise UsageError(f"{os.fspath(path)}: mount {mnt_id} is not in {MOUNTINFO}")
        return self.enrich(mount)

    def target_mount(self, path: str | os.PathLike[str]) -> Mount:
        """Like :meth:`find`, but refuse pseudo filesystems (``/proc``, ``/sys`` …)."""
        mount = self.find(path)
        if is_pseudo(mount):
            raise UnsupportedMount(
                f"{os.fspath(path)} is on {mount.mount_point}, a {mount.fstype} pseudo filesystem: "
                "it holds no files to checkpoint"
            )
        return mount

    def enrich(self, mount: Mount) -> Mount:
        cached = self._enriched.get(mount.mount_id)
        if cached is None:
            cached = enrich(mount)
            self._enriched[mount.mount_id] = cached
        return cached

    def ancestors(self, mount: Mount) -> list[Mount]:
        """Mounts that ``mount`` is mounted on, nearest first."""
        chain: list[Mount] = []
        seen = {mount.mount_id}
        parent = self.by_id.get(mount.parent_id)
        while parent is not None and parent.mount_id not in seen:
            chain.append(parent)
            seen.add(parent.mount_id)
            parent = self.by_id.get(parent.parent_id)
        return chain

    def lives_on(self, mount: Mount, other: Mount) -> bool:
        """True when ``mount`` depends on ``other``: it is nested in it, or its
        loop device's backing file is on it. Such a mount is frozen first."""
        if mount.mount_id == other.mount_id:
            return False
        if any(a.mount_id == other.mount_id for a in self.ancestors(mount)):
            return True
        backing = self.enrich(mount).loop_backing_file
        if backing:
            try:
                holder = self.find(backing)
            except UsageError:
                return False
            if holder.mount_id == other.mount_id or holder.dev == other.dev:
                return True
            return self.lives_on(holder, other)
        return False


def find_mount(path: str | os.PathLike[str]) -> Mount:
    """The mount that holds ``path`` now, with its device (what a backend's ``probe``
    is given for it)."""
    return MountTable.read().find(path)


def is_pseudo(mount: Mount) -> bool:
    return mount.fstype in PSEUDO_FILESYSTEMS


@functools.cache
def _udev_context() -> Any:
    """One pyudev context per process, the core's and every backend's.

    Making a context loads libudev; doing that right before a freeze was measured
    to lengthen the FIFREEZE that followed from ~23 ms to ~38 ms, so it is made
    once, outside any window.
    """
    import pyudev  # lazily: the CLI's --help must stay fast

    return pyudev.Context()


def udev_device(devnum: int) -> Any:
    """The pyudev device of block device ``devnum`` (this process's one context),
    or None when udev does not know it."""
    import pyudev

    try:
        return pyudev.Devices.from_device_number(_udev_context(), "block", devnum)
    except (pyudev.DeviceNotFoundError, OSError, ValueError):
        return None


def udev_attr(device: Any, name: str) -> str | None:
    """A sysfs attribute of a pyudev device, stripped; None when absent or empty."""
    try:
        value: str = device.attributes.asstring(name).strip()
    except (KeyError, UnicodeDecodeError, OSError):
        return None
    return value or None


def enrich(mount: Mount) -> Mount:
    """Fill in the block device behind ``mount`` from sysfs.

    The attributes are read straight from ``/sys/dev/block/MAJ:MIN`` (what pyudev
    reads too; importing it and loading libudev cost ~4 ms of the CLI's start);
    pyudev is the fallback where sysfs does not answer.
    """
    devnum = block_devnum(mount)
    if devnum is None:
        return mount
    facts = _sysfs_facts(devnum) or _udev_facts(devnum)
    if facts is None:
        return mount
    devnode, backing, dm_name, dm_uuid = facts
    if backing and backing.endswith(" (deleted)"):
        backing = backing[: -len(" (deleted)")]
    return replace(mount, devnode=devnode, loop_backing_file=backing, dm_name=dm_name, dm_uuid=dm_uuid)


#: (device node, loop backing file, dm name, dm uuid)
_Facts = tuple[str | None, str | None, str | None, str | None]


def _sysfs_facts(devnum: int) -> _Facts | None:
    sysdir = f"/sys/dev/block/{os.major(devnum)}:{os.minor(devnum)}"
    uevent = _read_attr(f"{sysdir}/uevent")
    if uevent is None:
        return None
    props = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line)
    return (
        f"/dev/{props['DEVNAME']}" if props.get("DEVNAME") else None,
        _read_attr(f"{sysdir}/loop/backing_file"),
        _read_attr(f"{sysdir}/dm/name"),
        _read_attr(f"{sysdir}/dm/uuid"),
    )


def _read_attr(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _udev_facts(devnum: int) -> _Facts | None:
    device = udev_device(devnum)
    if device is None:
        return None
    return (
        device.device_node,
        udev_attr(device, "loop/backing_file"),
        udev_attr(device, "dm/name") or device.properties.get("DM_NAME"),
        udev_attr(device, "dm/uuid") or device.properties.get("DM_UUID"),
    )


def resolve_paths(table: MountTable, paths: Iterable[str | os.PathLike[str]]) -> list[Mount]:
    """The distinct, non-pseudo mounts holding ``paths``, in the order given."""
    seen: dict[int, Mount] = {}
    for path in paths:
        if not Path(path).exists():
            raise UsageError(f"{os.fspath(path)}: no such file or directory")
        mount = table.target_mount(path)
        seen.setdefault(mount.mount_id, mount)
    return list(seen.values())


def freeze_levels(table: MountTable, mounts: Sequence[Mount]) -> list[list[Mount]]:
    """Group ``mounts`` into levels to freeze one after another, each in parallel.

    A mount is frozen before any mount it lives on (its loop file's filesystem, the
    mount it is nested in) and thawed after it: freezing the outer one first would
    leave the inner one unable to flush into its backing file.
    """
    remaining = list(mounts)
    levels: list[list[Mount]] = []
    while remaining:
        # a mount can go now when no other remaining mount lives on it
        level = [m for m in remaining if not any(table.lives_on(o, m) for o in remaining if o is not m)]
        if not level:  # a cycle cannot happen with real mounts; keep going anyway
            level = list(remaining)
        levels.append(level)
        remaining = [m for m in remaining if m not in level]
    return levels
