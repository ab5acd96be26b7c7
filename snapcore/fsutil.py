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
