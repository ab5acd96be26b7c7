"""Small filesystem helpers the core and backends share."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes

    from snapcore.types import Mount


@functools.cache
def _libc() -> ctypes.CDLL:
    import ctypes  # on first use: ~1 ms of the CLI's start otherwise

    return ctypes.CDLL(None, use_errno=True)


def syncfs(path: str | os.PathLike[str]) -> None:
    """Write back the whole filesystem holding ``path`` (syncfs(2)).

    Called before a freeze so the freeze itself is short, and after an export so it
    is on disk before the manifest calls it complete.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc().syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
    finally:
        os.close(fd)


def block_devnum(mount: Mount) -> int | None:
    """The number of the block device behind ``mount``, or None when there is none.

    btrfs and others report an anonymous device number: their source (or the device
    node already found for them) names the real one.
    """
    if mount.major != 0:
        return mount.dev
    path = mount.devnode or mount.source
    if not path.startswith("/dev/"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    import stat

    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 MiB``, ``2.0 TiB``: sizes in messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def check_ancestors(path: str | os.PathLike[str]) -> None:
    """Refuse ``path`` when a directory above it could be changed by someone else
    (as OpenSSH checks ``authorized_keys``): each existing ancestor must belong to
    root (or to us) and be writable by nobody else, unless it is sticky and root's
    (``/tmp``), where others cannot rename or remove what is ours."""
    import stat

    from snapcore.errors import SnapcoreError

    current = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(current)
        except FileNotFoundError:
            st = None
        if st is not None:
            sticky_root = bool(st.st_mode & stat.S_ISVTX) and st.st_uid == 0
            if not _trusted_owner(st):
                raise SnapcoreError(f"{current} (above {path}) belongs to uid {st.st_uid}: refusing to use {path}")
            if st.st_mode & 0o022 and not sticky_root:
                raise SnapcoreError(
                    f"{current} (above {path}) is writable by others (mode {st.st_mode & 0o7777:o}): "
                    f"refusing to use {path}"
                )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def secure_dir(path: str | os.PathLike[str]) -> str:
    """Make sure ``path`` is a directory only root (or we) can change, creating it
    0700 if needed, after its ancestors were checked (nothing is created under a
    place someone else controls): not a symlink, ours, writable by nobody else."""
    import stat

    from snapcore.errors import SnapcoreError

    check_ancestors(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SnapcoreError(f"{path} is not a directory (a symlink?): refusing to use it")
    if not _trusted_owner(st):
        raise SnapcoreError(f"{path} belongs to uid {st.st_uid}, not root: refusing to use it")
    if st.st_mode & 0o022:
        raise SnapcoreError(f"{path} is writable by others (mode {st.st_mode & 0o777:o}): chmod 700 it")
    return os.fspath(path)


def read_regular(path: str | os.PathLike[str], limit: int, *, owned: bool = False) -> bytes:
    """The content of the regular file ``path``, read through one descriptor opened
    without following a symlink or blocking (a FIFO or device in its place is
    refused, never read): at most ``limit`` bytes, or an error. ``owned``: it must
    also belong to root (or us) and be writable by nobody else (a state directory's
    manifests), as must every directory above it. Raises :class:`OSError` or
    :class:`SnapcoreError`."""
    import stat

    from snapcore.errors import SnapcoreError

    if owned:
        check_ancestors(path)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapcoreError(f"{os.fspath(path)} is not a regular file: refusing to read it")
        if owned and (not _trusted_owner(st) or st.st_mode & 0o022):
            raise SnapcoreError(
                f"{os.fspath(path)} belongs to uid {st.st_uid} with mode {st.st_mode & 0o777:o}: "
                "refusing a file someone else could have written"
            )
        if st.st_size > limit:
            raise SnapcoreError(f"{os.fspath(path)} is {st.st_size} bytes, over the {limit} allowed: refusing it")
        chunks = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise SnapcoreError(f"{os.fspath(path)} grew over the {limit} bytes allowed: refusing it")
        return b"".join(chunks)
    finally:
        os.close(fd)


def process_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a reused pid apart."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 4096).rsplit(b")", 1)[1].split()[19].decode("utf-8", "replace")
        finally:
            os.close(fd)
    except (OSError, IndexError):
        return None
