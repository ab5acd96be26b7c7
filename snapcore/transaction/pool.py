"""The threads that freeze, snapshot and export a level's targets in parallel."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: the command starts faster
    from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_POOL_WIDTH = 0
_POOL_LOCK = threading.Lock()


def shared_pool(width: int) -> ThreadPoolExecutor:
    """One pool per process, its threads all started before any window: starting 16
    threads costs ~10 ms, paid once per process rather than once per checkpoint."""
    global _POOL, _POOL_WIDTH
    with _POOL_LOCK:
        if _POOL is None or width > _POOL_WIDTH:
            if _POOL is not None:
                _POOL.shutdown(wait=True)
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=width, thread_name_prefix="snapcore")
            _POOL_WIDTH = width
            barrier = threading.Barrier(width)
            for future in [_POOL.submit(barrier.wait, 5.0) for _ in range(width)]:
                future.result()
        return _POOL
