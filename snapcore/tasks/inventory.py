"""The open-file inventory of a task set: what the tasks need from the filesystems.

For every task it reads ``/proc/PID/fd`` (with ``fdinfo``: position, open flags,
mount id), ``cwd``, ``root`` and ``maps`` (through ``map_files``), keeps what lives
on a real filesystem (pseudo filesystems, sockets, pipes, memfds are skipped), and
merges it per file (device, inode). Each file gets a state:

* ``present`` — the path still names this inode;
* ``deleted`` — the kernel marks the name ``(deleted)`` and nothing is at the path;
* ``renamed-over`` — the name was unlinked and another inode is at the path now
  (another file renamed over it, or deleted and re-created);
* ``renamed`` — the path (not marked deleted) names nothing or another inode, as
  seen from the task's root; the watch reports renames made after the inventory.

Deleted or renamed-over regular files are lost with the tasks: :func:`copy_ghosts`
copies their content through ``/proc/PID/fd/N`` or ``map_files`` (as CRIU does with
ghost files) into a directory, up to a byte budget. Copy while the tasks are frozen,
so a task cannot write to the file after its copy.

A task in another mount namespace (a container) reports mount ids of that namespace:
they are mapped onto the host's mounts (:mod:`snapcore.tasks.mountns`), each file keeps
the path the task sees and gets ``host_path``, where the host sees it; a file on a mount
the host does not have is named in a warning.

Records are frozen dataclasses; :meth:`Inventory.to_json` gives the manifest's
``files`` field.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from snapcore.host.mounts import MountTable, is_pseudo
from snapcore.policy import DEFAULT_GHOST_LIMIT
from snapcore.tasks.mountns import NamespaceMounts
from snapcore.types import Mount

_DELETED = " (deleted)"


class FileState(StrEnum):
    PRESENT = "present"
    DELETED = "deleted"
    RENAMED = "renamed"
    RENAMED_OVER = "renamed-over"


class UseKind(StrEnum):
    FD = "fd"
    CWD = "cwd"
    ROOT = "root"
    MAP = "map"


@dataclass(frozen=True, slots=True, kw_only=True)
class Use:
    """One way a task holds a file."""

    pid: int
    kind: UseKind
    #: The descriptor number (``fd``), else None.
    fd: int | None = None
    #: Open flags (``fdinfo`` ``flags``, as an int) and file position, for ``fd``.
    flags: int | None = None
    pos: int | None = None
    #: ``start-end`` of the mapping, for ``map``.
    mapping: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"pid": self.pid, "kind": self.kind.value}
        if self.fd is not None:
            data.update(fd=self.fd, flags=f"0{self.flags:o}" if self.flags is not None else None, pos=self.pos)
        if self.mapping is not None:
            data["mapping"] = self.mapping
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class Ghost:
    """The saved content of a deleted or renamed-over file."""

    #: Where the copy is; None when it was not copied (see ``note``).
    path: str | None
    size: int
    sha256: str | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "note": self.note}


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenFile:
    """One file (device + inode) the tasks need."""

    path: str
    #: Other names the tasks reach the same inode by (hard links).
    other_paths: tuple[str, ...] = ()
    #: ``S_IFMT`` of the file: ``file``, ``dir``, ``fifo``, ``chr``, ``blk``, ``sock``.
    kind: str
    mount_id: int
    mount_point: str
    fstype: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    mode: int
    nlink: int
    state: FileState
    mapped: bool
    uses: tuple[Use, ...]
    #: A ``/proc`` path that reaches this inode while its task lives (fd or map_files).
    via: str
    ghost: Ghost | None = None
    #: Where the host sees the file when the task is in another mount namespace (a
    #: container) and ``path`` is the task's own view; None when they are the same.
    host_path: str | None = None
    #: Its content's sha256, as the tasks had it (:mod:`snapcore.tasks.digests`), and
    #: why there is none when there is none.
    sha256: str | None = None
    digest_note: str | None = None
    #: Changed by someone else while the tasks were stopped (``on_change: warn``):
    #: the image holds that change, not what the tasks had.
    changed: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    @property
    def needs_ghost(self) -> bool:
        """Only the tasks hold this content: a regular file deleted or renamed over."""
        return self.kind == "file" and self.state in (FileState.DELETED, FileState.RENAMED_OVER)

    def to_json(self) -> dict[str, Any]:
        fd_use = next((u for u in self.uses if u.kind is UseKind.FD), None)
        return {
            "path": self.path,
            "other_paths": list(self.other_paths),
            "kind": self.kind,
            "mount": self.mount_point,
            "mount_id": self.mount_id,
            "fstype": self.fstype,
            "device": f"{os.major(self.dev)}:{os.minor(self.dev)}",
            "inode": self.ino,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "mode": f"0{stat.S_IMODE(self.mode):o}",
            "nlink": self.nlink,
            "state": self.state.value,
            "deleted": self.state in (FileState.DELETED, FileState.RENAMED_OVER),
            "mapped": self.mapped,
            "flags": f"0{fd_use.flags:o}" if fd_use is not None and fd_use.flags is not None else None,
            "pos": fd_use.pos if fd_use is not None else None,
            "uses": [u.to_json() for u in self.uses],
            "ghost": self.ghost.to_json() if self.ghost is not None else None,
            **({"host_path": self.host_path} if self.host_path is not None else {}),
            "sha256": self.sha256,
            **({"digest_note": self.digest_note} if self.digest_note else {}),
            **({"changed": True} if self.changed else {}),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Inventory:
    """Every file a task set needs, and the mounts they are on."""

    pids: tuple[int, ...]
    files: tuple[OpenFile, ...]
    #: Distinct non-pseudo mounts the files are on, in order of first use.
    mounts: tuple[Mount, ...]
    #: Uses skipped: sockets, pipes, anonymous inodes, pseudo filesystems, memfds.
    skipped: int = 0
    warnings: tuple[str, ...] = ()

    def to_json(self) -> list[dict[str, Any]]:
        """The manifest's ``files`` field."""
        return [f.to_json() for f in self.files]

    def by_key(self) -> dict[tuple[int, int], OpenFile]:
        return {f.key: f for f in self.files}

    @property
    def ghosts_needed(self) -> tuple[OpenFile, ...]:
        return tuple(f for f in self.files if f.needs_ghost)


# -- reading /proc -------------------------------------------------------------------

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
    stat.S_IFLNK: "link",
}


def _fdinfo(path: str) -> tuple[int, int, int] | None:
    """``(pos, flags, mnt_id)`` from an fdinfo file; None when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)
    except (FileNotFoundError, ProcessLookupError):  # the descriptor was closed meanwhile
        return None
    finally:
        os.close(fd)
    pos = flags = mnt = -1
    for line in data.split(b"\n", 4)[:4]:
        if line.startswith(b"pos:"):
            pos = int(line[4:])
        elif line.startswith(b"flags:"):
            flags = int(line[6:], 8)
        elif line.startswith(b"mnt_id:"):
            mnt = int(line[7:])
    return pos, flags, mnt


def _mnt_id_of(path: str) -> int | None:
    """Mount id of what a /proc magic link points to (through an O_PATH descriptor)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = _fdinfo(f"/proc/self/fdinfo/{fd}")
    finally:
        os.close(fd)
    return info[2] if info else None


@dataclass(slots=True)
class _Entry:
    path: str
    marked_deleted: bool
    st: os.stat_result
    mount_id: int
    via: str
    pid: int
    uses: list[Use]
    other_paths: list[str]
    mapped: bool
    host_path: str | None = None


class _Collector:
    def __init__(self, table: MountTable) -> None:
        self.table = table
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.skipped = 0
        self.warnings: list[str] = []
        self._pseudo: dict[int, bool] = {}
        self.namespaces = NamespaceMounts(table)
        #: each task's mount namespace when it is not ours (a container's)
        self._ns: dict[int, int | None] = {}
        self._unmapped: set[tuple[int, int]] = set()

    def _mount_ok(self, mnt_id: int) -> bool:
        ok = self._pseudo.get(mnt_id)
        if ok is None:
            mount = self.table.by_id.get(mnt_id)
            ok = mount is not None and not is_pseudo(mount)
            self._pseudo[mnt_id] = ok
        return ok

    def _host(self, pid: int, mnt_id: int, path: str, st: os.stat_result) -> tuple[int, str | None] | None:
        """The host's mount id for a task's ``mnt_id`` and, for a task in another mount
        namespace, where the host sees ``path``; None when the file is not ours to
        image (a pseudo filesystem, or a mount the host does not have: warned)."""
        ns = self._ns.get(pid)
        if ns is None:
            return (mnt_id, None) if self._mount_ok(mnt_id) else None
        inner = self.namespaces.inner_mount(pid, ns, mnt_id)
        if inner is None or is_pseudo(inner):
            return None
        mapped = self.namespaces.mapped(ns, inner)
        if mapped is None:
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                return None  # /dev/null on the container's own /dev: a device, no content to keep
            if (ns, mnt_id) not in self._unmapped:
                self._unmapped.add((ns, mnt_id))
                self.warnings.append(NamespaceMounts.unmapped_reason(pid, inner))
            return None
        return mapped.host.mount_id, mapped.host_path(path)

    def add(self, pid: int, link: str, via: str, use: Use, st: os.stat_result, mnt_id: int, *, mapped: bool) -> None:
        marked = link.endswith(_DELETED)
        path = link[: -len(_DELETED)] if marked else link
        host = self._host(pid, mnt_id, path, st)
        if host is None:
            self.skipped += 1
            return
        host_mnt_id, host_path = host
        key = (st.st_dev, st.st_ino)
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = _Entry(path, marked, st, host_mnt_id, via, pid, [use], [], mapped, host_path)
            return
        entry.uses.append(use)
        entry.mapped = entry.mapped or mapped
        if entry.marked_deleted and not marked:
            # a hard link still names it: that is the path to keep
            entry.other_paths.append(entry.path)
            entry.path, entry.marked_deleted, entry.pid = path, False, pid
        elif path != entry.path and path not in entry.other_paths:
            entry.other_paths.append(path)

    def task(self, pid: int) -> None:
        base = f"/proc/{pid}"
        self._ns[pid] = self.namespaces.namespace_of(pid)
        try:
            fds = os.listdir(f"{base}/fd")
        except (FileNotFoundError, ProcessLookupError):
            self.warnings.append(f"pid {pid} exited during the inventory")
            return
        except PermissionError:
            self.warnings.append(f"pid {pid}: permission denied reading its descriptors (run as root)")
            return
        for name in fds:
            via = f"{base}/fd/{name}"
            try:
                link = os.readlink(via)
            except OSError:
                continue  # closed meanwhile
            if not link.startswith("/"):
                self.skipped += 1  # socket:[…], pipe:[…], anon_inode:[…]
                continue
            try:
                st = os.stat(via)
            except OSError:
                continue
            info = _fdinfo(f"{base}/fdinfo/{name}")
            if info is None:
                continue
            pos, flags, mnt_id = info
            use = Use(pid=pid, kind=UseKind.FD, fd=int(name), flags=flags, pos=pos)
            self.add(pid, link, via, use, st, mnt_id, mapped=False)
        for kind in (UseKind.CWD, UseKind.ROOT):
            via = f"{base}/{kind.value}"
            try:
                link = os.readlink(via)
                st = os.stat(via)
            except OSError:
                continue
            dir_mnt = _mnt_id_of(via)
            if dir_mnt is not None and link.startswith("/"):
                self.add(pid, link, via, Use(pid=pid, kind=kind), st, dir_mnt, mapped=False)
        self._maps(pid, base)

    def _maps(self, pid: int, base: str) -> None:
        try:
            with open(f"{base}/maps", "rb") as f:
                lines = f.read().splitlines()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return
        seen: set[bytes] = set()
        for line in lines:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[4] == b"0" or not parts[5].startswith(b"/"):
                continue
            ident = parts[3] + b" " + parts[4]  # dev and inode: one entry per file
            if ident in seen:
                continue
            seen.add(ident)
            mapping = _map_files_name(parts[0])
            via = f"{base}/map_files/{mapping}"
            try:
                st = os.stat(via)
            except OSError:
                continue
            link = os.fsdecode(parts[5])
            key = (st.st_dev, st.st_ino)
            entry = self.entries.get(key)
            use = Use(pid=pid, kind=UseKind.MAP, mapping=mapping)
            if entry is not None:  # known already: skip the mount lookup
                entry.uses.append(use)
                entry.mapped = True
                continue
            mnt_id = _mnt_id_of(via)
            if mnt_id is None:
                continue
            self.add(pid, link, via, use, st, mnt_id, mapped=True)


def _map_files_name(span: bytes) -> str:
    """``/proc/PID/map_files`` names a mapping by its bounds without the zero padding
    ``maps`` gives them: ``00400000-0041f000`` there is ``400000-41f000`` here (a
    non-PIE binary, mapped below 0x10000000)."""
    start, _, end = span.partition(b"-")
    return f"{int(start, 16):x}-{int(end, 16):x}"


def _state(entry: _Entry) -> FileState:
    """Is the recorded path still this inode (seen from the task's root)?"""
    try:
        now = os.stat(f"/proc/{entry.pid}/root{entry.path}")
    except OSError:
        now = None
    if now is not None and (now.st_dev, now.st_ino) == (entry.st.st_dev, entry.st.st_ino):
        return FileState.PRESENT
    if entry.marked_deleted:
        return FileState.DELETED if now is None else FileState.RENAMED_OVER
    return FileState.RENAMED


def take_inventory(
    pids: Iterable[int],
    *,
    table: MountTable | None = None,
    ghost_dir: str | os.PathLike[str] | None = None,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
) -> Inventory:
    """The files ``pids`` hold open, have as cwd or root, or map.

    Args:
        table: the mount table (read fresh by default).
        ghost_dir: when given, :func:`copy_ghosts` runs into it (see there).
        ghost_limit: byte budget for ghost copies.

    A task that exits meanwhile is skipped with a warning; no error is raised.
    """
    table = table or MountTable.read()
    collector = _Collector(table)
    pid_list = tuple(pids)
    for pid in pid_list:
        collector.task(pid)
    files: list[OpenFile] = []
    mounts: dict[int, Mount] = {}
    for (dev, ino), e in collector.entries.items():
        mount = table.by_id[e.mount_id]
        mounts.setdefault(mount.mount_id, mount)
        st = e.st
        files.append(
            OpenFile(
                path=e.path,
                other_paths=tuple(e.other_paths),
                kind=_KINDS.get(stat.S_IFMT(st.st_mode), "other"),
                mount_id=e.mount_id,
                mount_point=mount.mount_point,
                fstype=mount.fstype,
                dev=dev,
                ino=ino,
                size=st.st_size,
                mtime_ns=st.st_mtime_ns,
                mode=st.st_mode,
                nlink=st.st_nlink,
                state=_state(e),
                mapped=e.mapped,
                uses=tuple(e.uses),
                via=e.via,
                host_path=e.host_path if e.host_path != e.path else None,
            )
        )
    inventory = Inventory(
        pids=pid_list,
        files=tuple(files),
        mounts=tuple(mounts.values()),
        skipped=collector.skipped,
        warnings=tuple(collector.warnings),
    )
    if ghost_dir is not None:
        inventory = copy_ghosts(inventory, ghost_dir, limit=ghost_limit)
    return inventory


# -- ghost copies ---------------------------------------------------------------------


def _copy(source: str, dest: str, limit: int) -> tuple[int, str]:
    """Copy at most ``limit`` bytes (raising past it); returns (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            while True:
                chunk = os.pread(src, 1 << 20, size)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _OverBudget(size)
                digest.update(chunk)
                os.write(dst, chunk)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return size, digest.hexdigest()


class _OverBudget(Exception):
    pass


def copy_ghosts(
    inventory: Inventory,
    dest: str | os.PathLike[str],
    *,
    limit: int = DEFAULT_GHOST_LIMIT,
    files: Sequence[OpenFile] | None = None,
) -> Inventory:
    """Copy the content of every deleted or renamed-over regular file into ``dest``
    (``MAJOR.MINOR-INODE`` names), reading through ``/proc/PID/fd/N`` or
    ``map_files``, until ``limit`` bytes in all. Files over the budget get a
    :class:`Ghost` with ``path=None`` and a note, and a warning. Returns the
    inventory with ``ghost`` filled in. ``dest`` must not be on a mount being frozen.
    """
    directory = os.fspath(dest)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    wanted = {f.key for f in (files if files is not None else inventory.ghosts_needed)}
    budget = limit
    warnings = list(inventory.warnings)
    out: list[OpenFile] = []
    for f in inventory.files:
        if f.key not in wanted or (f.ghost is not None and f.ghost.path is not None):
            out.append(f)
            continue
        name = os.path.join(directory, f"{os.major(f.dev)}.{os.minor(f.dev)}-{f.ino}")
        ghost: Ghost
        if f.size > budget:
            ghost = Ghost(path=None, size=f.size, note=f"not copied: over ghost_limit ({limit} bytes)")
        else:
            try:
                size, sha = _copy(f.via, name, budget)
                budget -= size
                ghost = Ghost(path=name, size=size, sha256=sha)
            except _OverBudget:  # it grew while copied
                os.unlink(name)
                ghost = Ghost(path=None, size=f.size, note=f"not copied: over ghost_limit ({limit} bytes)")
            except OSError as exc:
                ghost = Ghost(path=None, size=f.size, note=f"not copied: {exc.strerror or exc}")
        if ghost.path is None:
            warnings.append(f"{f.path} ({f.state.value}): ghost {ghost.note}")
        out.append(replace(f, ghost=ghost))
    return replace(inventory, files=tuple(out), warnings=tuple(warnings))
