"""Small filesystem helpers the core and backends share."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ctypes


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
