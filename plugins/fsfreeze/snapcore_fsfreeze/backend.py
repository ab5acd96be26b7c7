"""FIFREEZE/FITHAW on a mounted filesystem, in-process (no ``fsfreeze`` subprocess).

A frozen filesystem blocks every writer until it is thawed, so a freeze keeps the
directory descriptor it was made through until the thaw, and the thaw tolerates a
filesystem that someone (the deadline watchdog) already thawed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from snapcore import FIFREEZE, FITHAW, BackendError, FrozenElsewhere, Mount, ThawError

#: Filesystems whose kernel driver implements freezing.
FREEZABLE = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "nilfs2", "gfs2", "ocfs2", "bcachefs"}
)


def freezable(mount: Mount) -> tuple[bool, str]:
    if mount.fstype not in FREEZABLE:
        return False, f"{mount.fstype} cannot be frozen (FIFREEZE works on {', '.join(sorted(FREEZABLE))})"
    if mount.root != "/" and mount.fstype != "btrfs":
        # a bind mount of a subdirectory: freezing it freezes the whole filesystem
        return (
            True,
            f"freezes the whole {mount.fstype} filesystem of {mount.source} (this is a bind mount of {mount.root})",
        )
    return True, f"{mount.fstype} supports FIFREEZE"


class _Frozen:
    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path


class Freezer:
    """Freezes and thaws mounts; thread-safe across different mounts."""

    def __init__(self) -> None:
        self._frozen: dict[str, _Frozen] = {}
        self._lock = threading.Lock()

    def freeze(self, key: str, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EBUSY:
                raise FrozenElsewhere(
                    "already frozen by someone else (FIFREEZE: EBUSY); left alone — thaw it with "
                    "'fsfreeze -u' only if you know who froze it",
                    mount=path,
                    backend="fsfreeze",
                ) from exc
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise BackendError("this filesystem cannot be frozen", mount=path, backend="fsfreeze") from exc
            if exc.errno == errno.EPERM:
                raise BackendError("FIFREEZE needs root (CAP_SYS_ADMIN)", mount=path, backend="fsfreeze") from exc
            raise BackendError(f"FIFREEZE failed: {exc.strerror}", mount=path, backend="fsfreeze") from exc
        with self._lock:
            self._frozen[key] = _Frozen(fd=fd, path=path)

    def thaw(self, key: str) -> bool:
        """Thaw what :meth:`freeze` froze under ``key``; False when it was not frozen."""
        with self._lock:
            entry = self._frozen.pop(key, None)
        if entry is None:
            return False
        try:
            fcntl.ioctl(entry.fd, FITHAW, 0)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not frozen (already thawed)
                raise ThawError(
                    f"FITHAW failed: {exc.strerror}; run 'fsfreeze -u {entry.path}'",
                    mount=entry.path,
                    backend="fsfreeze",
                ) from exc
        finally:
            os.close(entry.fd)
        return True

    def is_frozen(self, key: str) -> bool:
        with self._lock:
            return key in self._frozen
