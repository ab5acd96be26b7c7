"""One checkpoint per mount at a time: ``flock`` on ``RUN/locks/<mount>.lock``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path

from snapcore.errors import LockBusy

#: Where journals and locks live unless ``--run-dir`` or ``SNAPCORE_RUN_DIR`` says otherwise.
DEFAULT_RUN_DIR = "/run/snapcore"


def default_run_dir() -> Path:
    """``SNAPCORE_RUN_DIR``, else ``/run/snapcore``: the journal, the locks, the guard's records."""
    return Path(os.environ.get("SNAPCORE_RUN_DIR") or DEFAULT_RUN_DIR)


class MountLock:
    """An exclusive, non-blocking lock on one mount point, released on close or death."""

    def __init__(self, run_dir: Path, mount_point: str, checkpoint_id: str) -> None:
        self.path = run_dir / "locks" / f"{lock_name(mount_point)}.lock"
        self.mount_point = mount_point
        self.checkpoint_id = checkpoint_id
        self.fd: int | None = None

    def acquire(self) -> None:
        from snapcore.safety.journal import secure_dir

        secure_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockBusy(f"{self.mount_point} is being checkpointed already: {holder}") from None
            raise
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "checkpoint": self.checkpoint_id, "since": time.time(), "mount": self.mount_point}
        os.write(fd, json.dumps(info).encode())
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def lock_name(mount_point: str) -> str:
    """The mount point escaped as systemd does for unit names (``/var/lib`` is
    ``var-lib``), so that ``ls RUN/locks`` tells which mounts are busy; a digest
    when that would be too long for a file name."""
    path = mount_point.strip("/")
    if not path:
        return "-"
    out = []
    for i, ch in enumerate(path):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in "_:" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    name = "".join(out)
    if len(name) > 200:
        import hashlib

        name = "long-" + hashlib.sha256(mount_point.encode("utf-8", "surrogateescape")).hexdigest()
    return name


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return "by another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(data.get("since", 0)))
    return f"checkpoint {data.get('checkpoint')!r} of pid {data.get('pid')} since {since}"
