"""fanotify(7) through ctypes (the standard library has no binding; ``pyfanotify``
0.3.0 does not work here, see notes/machine.md): the calls and constants that the
change watch (notification events) and the open hold (permission events) use."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from typing import Any

# <linux/fanotify.h>
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_NOTIF = 0x00
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
#: Events carry the thread's id, not the process's: ``/proc/TID/syscall`` is the thread's.
FAN_REPORT_TID = 0x100

FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_MARK_FLUSH = 0x80
FAN_MARK_INODE = 0x00
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100

FAN_MODIFY = 0x02
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000

FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
AT_FDCWD = -100

#: ``struct fanotify_event_metadata``: event_len, vers, reserved, metadata_len, mask, fd, pid.
META = struct.Struct("=IBBHQii")
#: ``struct fanotify_response``: fd, response.
RESPONSE = struct.Struct("=iI")

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
        libc.fanotify_init.restype = ctypes.c_int
        libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
        libc.fanotify_mark.restype = ctypes.c_int
        _libc = libc
    return _libc


def _check(rc: int, path: str | None = None) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, os.strerror(err))
        raise OSError(err, os.strerror(err), path)
    return rc


def init(flags: int) -> int:
    """A new fanotify group (``fanotify_init``); its events' descriptors are opened
    read-only, close-on-exec."""
    return _check(int(_lib().fanotify_init(flags | FAN_CLOEXEC, os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE)))


def mark(fd: int, flags: int, mask: int, path: str) -> None:
    """``fanotify_mark(fd, flags, mask, AT_FDCWD, path)`` (a ``/proc/PID/fd/N`` path
    marks the inode it reaches)."""
    _check(int(_lib().fanotify_mark(fd, flags, mask, AT_FDCWD, os.fsencode(path))), path)


def flush(fd: int) -> None:
    """Remove every mark of the group (inode, mount and filesystem ones): no new
    event is queued after this."""
    for kind in (FAN_MARK_INODE, FAN_MARK_MOUNT, FAN_MARK_FILESYSTEM):
        _check(int(_lib().fanotify_mark(fd, FAN_MARK_FLUSH | kind, 0, AT_FDCWD, None)))


def read_events(fd: int, batch: int = 64) -> Iterator[tuple[int, int, int]]:
    """The events queued on a non-blocking group: ``(mask, fd, pid)`` each, until
    the queue is empty. Each event's descriptor is the caller's to close."""
    while True:
        try:
            buf = os.read(fd, batch * META.size)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            raise
        if not buf:
            return
        offset = 0
        while offset + META.size <= len(buf):
            event_len, _vers, _res, _mlen, mask, event_fd, pid = META.unpack_from(buf, offset)
            offset += event_len or META.size
            yield mask, event_fd, pid


def respond(fd: int, event_fd: int, allow: bool) -> None:
    """Answer a permission event: the opener's ``open`` goes on, or fails with ``EPERM``."""
    os.write(fd, RESPONSE.pack(event_fd, FAN_ALLOW if allow else FAN_DENY))
