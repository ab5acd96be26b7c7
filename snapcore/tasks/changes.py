"""The change watch: did a file the tasks need change after the inventory?

From the inventory until the tasks are thawed, every needed file is watched:

* **inotify** (``inotify_simple``), one watch per file inode (modify, rename,
  delete of the inode) and one per directory holding a needed name (delete,
  rename away, rename over of that name). Directory events for other names are
  ignored, so an idle or busy tree around the needed files raises no alarm.
* **fanotify** (ctypes; ``FAN_MARK_FILESYSTEM``, ``FAN_MODIFY``) on each whole
  filesystem holding needed files, where the kernel and our privileges allow: it
  names the writer's PID and catches writes through any hard link. Its events
  carry a descriptor of the written file, matched to the needed set by device and
  inode. Where it cannot run (no ``CAP_SYS_ADMIN``, a filesystem that refuses the
  mark) the watch says so in :attr:`ChangeWatch.warnings` and goes on with inotify.

A write that makes a file shorter than it was at the inventory is reported as a
truncation. A reader thread drains both queues while the watch runs, and
:meth:`ChangeWatch.results` drains once more before answering, so nothing already queued
is missed. Each :class:`Change` has a monotonic timestamp: changes the tasks made
themselves before they were frozen can be told apart with ``results(since=...)``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from inotify_simple import INotify
from inotify_simple import flags as inflags

from snapcore.host import fanotify
from snapcore.tasks.inventory import FileState, Inventory, OpenFile

log = logging.getLogger(__name__)


class ChangeKind(StrEnum):
    MODIFY = "modify"
    TRUNCATE = "truncate"
    DELETE = "delete"
    RENAME = "rename"
    RENAME_OVER = "rename-over"
    #: A kernel queue overflowed: changes may have been missed.
    OVERFLOW = "overflow"


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One change to a needed file."""

    kind: ChangeKind
    path: str
    dev: int | None = None
    ino: int | None = None
    detail: str = ""
    #: The process that made it (fanotify only), else None.
    pid: int | None = None
    source: str
    #: ``time.monotonic()`` when the watch saw it.
    at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "path": self.path,
            "device": f"{os.major(self.dev)}:{os.minor(self.dev)}" if self.dev is not None else None,
            "inode": self.ino,
            "detail": self.detail,
            "pid": self.pid,
            "source": self.source,
        }


# -- the watch -----------------------------------------------------------------------------

_FILE_MASK = inflags.MODIFY | inflags.MOVE_SELF | inflags.DELETE_SELF | inflags.MASK_ADD
_DIR_SELF_MASK = inflags.MOVE_SELF | inflags.DELETE_SELF | inflags.MASK_ADD | inflags.ONLYDIR
_PARENT_MASK = inflags.DELETE | inflags.MOVED_FROM | inflags.MOVED_TO | inflags.MASK_ADD | inflags.ONLYDIR


@dataclass(frozen=True, slots=True, kw_only=True)
class Watched:
    """What the watch needs to know of a needed file."""

    path: str
    dev: int
    ino: int
    size: int
    is_dir: bool
    #: A path reaching the inode (``/proc/PID/fd/N``...): follows renames.
    via: str
    #: The task's root, to resolve ``path``'s directory as the task sees it.
    root: str = "/"
    #: Watch the directory entry too (not for already deleted files).
    watch_name: bool = True

    @classmethod
    def of(cls, f: OpenFile) -> Watched:
        pid = f.uses[0].pid
        return cls(
            path=f.path,
            dev=f.dev,
            ino=f.ino,
            size=f.size,
            is_dir=f.kind == "dir",
            via=f.via,
            root=f"/proc/{pid}/root",
            watch_name=f.state in (FileState.PRESENT,),
        )


class ChangeWatch:
    """Watch needed files for changes. ``start``, ``results``, ``stop`` (or ``with``).

    Args:
        files: the inventory's files (:class:`OpenFile` or :class:`Watched`).
        fanotify: also mark whole filesystems with fanotify where possible.
        thread: drain the kernel queues in a background thread while running
            (else only when :meth:`results` is called: fine for short watches).
    """

    def __init__(
        self,
        files: Iterable[OpenFile | Watched] | Inventory,
        *,
        fanotify: bool = True,
        thread: bool = True,
    ) -> None:
        items = files.files if isinstance(files, Inventory) else files
        self.files = tuple(f if isinstance(f, Watched) else Watched.of(f) for f in items)
        self.use_fanotify = fanotify
        self.use_thread = thread
        self.by_key = {(f.dev, f.ino): f for f in self.files}
        self.warnings: list[str] = []
        self.fanotify_marks: list[str] = []
        self.inotify_watches = 0
        self._inotify: INotify | None = None
        self._fan_fd: int | None = None
        self._self_wds: dict[int, list[Watched]] = {}
        self._name_wds: dict[int, dict[str, list[Watched]]] = {}
        self._changes: list[Change] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self.started_at: float | None = None
        self.running = False

    # -- setup --------------------------------------------------------------------

    def start(self) -> None:
        """Add every watch; from here on changes are recorded."""
        if self.running:
            return
        self.started_at = time.monotonic()
        self._inotify = INotify(nonblocking=True)
        dir_wds: dict[str, int] = {}
        add = self._inotify.add_watch
        out_of_watches = False
        for f in self.files:
            if out_of_watches:
                break
            try:
                wd = add(f.via, _DIR_SELF_MASK if f.is_dir else _FILE_MASK)
                self._self_wds.setdefault(wd, []).append(f)
                if f.watch_name and f.path != "/":
                    parent, name = os.path.split(f.path)
                    wd = dir_wds.get(parent, -1)
                    if wd < 0:
                        wd = add(f.root + parent, _PARENT_MASK)
                        dir_wds[parent] = wd
                    self._name_wds.setdefault(wd, {}).setdefault(name, []).append(f)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    out_of_watches = True
                    self.warnings.append(
                        "inotify: out of watches (fs.inotify.max_user_watches); "
                        f"{len(self.files)} files, some unwatched by inotify"
                    )
                elif exc.errno in (errno.ENOENT, errno.ESRCH):
                    self._record(ChangeKind.DELETE, f, "gone before the watch started", "inotify")
                else:
                    self.warnings.append(f"inotify: cannot watch {f.path}: {exc.strerror}")
        self.inotify_watches = len(self._self_wds) + len(self._name_wds)
        if self.use_fanotify:
            self._start_fanotify()
        self.running = True
        if self.use_thread:
            self._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._thread = threading.Thread(target=self._loop, name="snapcore-watch", daemon=True)
            self._thread.start()

    def _start_fanotify(self) -> None:
        per_dev: dict[int, Watched] = {}
        for f in self.files:
            per_dev.setdefault(f.dev, f)
        if not per_dev:
            return
        try:
            self._fan_fd = fanotify.init(
                fanotify.FAN_CLASS_NOTIF | fanotify.FAN_NONBLOCK | fanotify.FAN_UNLIMITED_QUEUE
            )
        except OSError as exc:
            self.warnings.append(f"fanotify unavailable ({exc.strerror}): inotify only")
            return
        for f in per_dev.values():
            try:
                fanotify.mark(
                    self._fan_fd, fanotify.FAN_MARK_ADD | fanotify.FAN_MARK_FILESYSTEM, fanotify.FAN_MODIFY, f.via
                )
                self.fanotify_marks.append(f"{os.major(f.dev)}:{os.minor(f.dev)}")
            except OSError as exc:
                self.warnings.append(f"fanotify cannot mark the filesystem of {f.path}: {exc.strerror}")
        if not self.fanotify_marks:
            os.close(self._fan_fd)
            self._fan_fd = None

    def descriptors(self) -> list[int]:
        """The kernel groups' descriptors (inotify, fanotify) while running."""
        fds = [self._inotify.fileno()] if self._inotify is not None else []
        return fds + ([self._fan_fd] if self._fan_fd is not None else [])

    # -- events -------------------------------------------------------------------

    def _record(self, kind: ChangeKind, f: Watched | None, detail: str, source: str, pid: int | None = None) -> None:
        self._changes.append(
            Change(
                kind=kind,
                path=f.path if f else "",
                dev=f.dev if f else None,
                ino=f.ino if f else None,
                detail=detail,
                pid=pid,
                source=source,
                at=time.monotonic(),
            )
        )

    def _modified(self, f: Watched, size: int | None, source: str, pid: int | None = None) -> None:
        if size is None:
            try:
                size = os.stat(f.via).st_size
            except OSError:
                size = None
        if size is not None and size < f.size:
            self._record(ChangeKind.TRUNCATE, f, f"size {f.size} -> {size}", source, pid)
        else:
            self._record(ChangeKind.MODIFY, f, "written" if size is None else f"size {f.size} -> {size}", source, pid)

    def _now_at(self, f: Watched) -> str:
        try:
            return os.readlink(f.via)
        except OSError:
            return "?"

    def _drain_inotify(self) -> None:
        if self._inotify is None:
            return
        for ev in self._inotify.read(timeout=0):
            if ev.mask & inflags.Q_OVERFLOW:
                self._record(ChangeKind.OVERFLOW, None, "inotify queue overflowed: changes may be missed", "inotify")
                continue
            if ev.name:
                for f in self._name_wds.get(ev.wd, {}).get(ev.name, ()):
                    if ev.mask & inflags.DELETE:
                        self._record(ChangeKind.DELETE, f, "name unlinked", "inotify")
                    elif ev.mask & inflags.MOVED_FROM:
                        self._record(ChangeKind.RENAME, f, f"now at {self._now_at(f)}", "inotify")
                    elif ev.mask & inflags.MOVED_TO:
                        self._record(ChangeKind.RENAME_OVER, f, "another file was renamed onto its path", "inotify")
                continue
            for f in self._self_wds.get(ev.wd, ()):
                if ev.mask & inflags.MODIFY and not f.is_dir:
                    self._modified(f, None, "inotify")
                elif ev.mask & inflags.MOVE_SELF:
                    self._record(ChangeKind.RENAME, f, f"now at {self._now_at(f)}", "inotify")
                elif ev.mask & inflags.DELETE_SELF:
                    self._record(ChangeKind.DELETE, f, "inode deleted", "inotify")

    def _drain_fanotify(self) -> None:
        if self._fan_fd is None:
            return
        for mask, fd, pid in fanotify.read_events(self._fan_fd):
            if mask & fanotify.FAN_Q_OVERFLOW:
                self._record(ChangeKind.OVERFLOW, None, "fanotify queue overflowed", "fanotify")
            if fd == fanotify.FAN_NOFD or fd < 0:
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            f = self.by_key.get((st.st_dev, st.st_ino))
            if f is not None and not f.is_dir:
                self._modified(f, st.st_size, "fanotify", pid)

    def drain(self) -> None:
        """Read what the kernel queued so far (thread-safe)."""
        with self._lock:
            self._drain_inotify()
            self._drain_fanotify()

    def _loop(self) -> None:
        assert self._wake is not None
        fds = [self._wake[0]]
        if self._inotify is not None:
            fds.append(self._inotify.fileno())
        if self._fan_fd is not None:
            fds.append(self._fan_fd)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while self.running:
            try:
                ready = poller.poll()
            except InterruptedError:
                continue
            if any(fd == self._wake[0] for fd, _ in ready):
                return
            try:
                self.drain()
            except Exception:  # a bug here must not kill the watch silently
                log.exception("change watch: reading events failed")
                with self._lock:
                    self._record(ChangeKind.OVERFLOW, None, "the watch failed to read events", "watch")

    # -- results -------------------------------------------------------------------

    def results(self, *, since: float | None = None) -> tuple[Change, ...]:
        """Changes seen so far (oldest first), one per file and kind (the first;
        a later one of the same kind from fanotify fills in the PID).

        Args:
            since: only changes seen at or after this ``time.monotonic()`` value.
        """
        if self.running:
            self.drain()
        with self._lock:
            changes = list(self._changes)
        out: dict[tuple[object, ...], Change] = {}
        for c in changes:
            if since is not None and c.at < since:
                continue
            key = (c.kind, c.dev, c.ino, c.path if c.dev is None else None)
            first = out.get(key)
            if first is None:
                out[key] = c
            elif first.pid is None and c.pid is not None:
                out[key] = replace(first, pid=c.pid, source=f"{first.source}+{c.source}")
        return tuple(out.values())

    def stop(self) -> tuple[Change, ...]:
        """Stop watching (idempotent); returns the final :meth:`results`."""
        if self.running:
            self.drain()
            self.running = False
            if self._wake is not None:
                os.write(self._wake[1], b"x")
            if self._thread is not None:
                self._thread.join(5)
                self._thread = None
            if self._wake is not None:
                os.close(self._wake[0])
                os.close(self._wake[1])
                self._wake = None
            closers: list[Callable[[], None]] = []
            if self._inotify is not None:
                closers.append(self._inotify.close)
                self._inotify = None
            if self._fan_fd is not None:
                closers.append(functools.partial(os.close, self._fan_fd))
                self._fan_fd = None
            if closers:
                # closing an inotify or fanotify descriptor waits for the kernel's SRCU
                # grace period (14 ms measured inside a CRIU post-dump): done aside, so
                # that the tasks' thaw, next, does not wait for it
                threading.Thread(target=_close_all, args=(closers,), name="snapcore-watch-close", daemon=True).start()
        return self.results()

    def __enter__(self) -> ChangeWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _close_all(closers: list[Callable[[], None]]) -> None:
    for close in closers:
        with contextlib.suppress(OSError):
            close()


def apply_changes(inventory: Inventory, changes: Iterable[Change]) -> Inventory:
    """The inventory with file states updated by the watch's changes (delete →
    ``deleted``, rename → ``renamed``, rename-over → ``renamed-over``), for the
    manifest. Files now needing a ghost copy show in ``ghosts_needed``."""
    new_state = {
        ChangeKind.DELETE: FileState.DELETED,
        ChangeKind.RENAME: FileState.RENAMED,
        ChangeKind.RENAME_OVER: FileState.RENAMED_OVER,
    }
    states: dict[tuple[int, int], FileState] = {}
    for c in changes:
        if c.dev is not None and c.ino is not None and c.kind in new_state:
            states[(c.dev, c.ino)] = new_state[c.kind]
    if not states:
        return inventory
    files = tuple(replace(f, state=states[f.key]) if f.key in states else f for f in inventory.files)
    return replace(inventory, files=files)
