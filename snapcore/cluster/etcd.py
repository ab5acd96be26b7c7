"""etcd for threads: :mod:`aetcd` (gRPC, asyncio) on an event loop of its own.

The agent and the coordinator are sequential programs whose every wait has a
deadline; they call :class:`Etcd` from ordinary threads, and each call returns within
its timeout or raises :class:`EtcdUnavailable`. Watches and lease keep-alives run on
the client's loop thread and report through callbacks.

aetcd is imported here only, and this module only by ``snapcore agent`` and
``snapcore checkpoint --cluster`` (gRPC's import costs ~80 ms: the other commands do
not pay it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from snapcore.cluster.protocol import Endpoint
from snapcore.errors import SnapcoreError, UsageError
from snapcore.log import get_logger

log = get_logger("snapcore.cluster")

T = TypeVar("T")

#: A watch's report: ``put``/``delete``, the key, the value (b"" for a delete); or,
#: once, ``error`` with the reason as the value when the watch broke.
WatchCallback = Callable[[str, str, bytes], None]


class EtcdUnavailable(SnapcoreError):
    """etcd did not answer in time, or refused."""


def _aetcd() -> Any:
    # gRPC's fork handlers abort a child forked while its threads run (GNU tar died
    # of SIGABRT, the guard's reply was garbled): the agent forks tar, rsync, CRIU
    # and its guard, each of which execs at once and needs none of gRPC's state
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    try:
        import aetcd
    except ImportError:
        raise UsageError("the etcd client library aetcd is not installed: pip install 'snapcore[cluster]'") from None
    return aetcd


class Lease:
    """An etcd lease kept alive from the loop thread (every third of its TTL).
    :attr:`lost` is set when no keep-alive worked for a whole TTL, or one found the
    lease expired: keys attached to it are gone or about to be."""

    def __init__(self, etcd: Etcd, lease: Any, ttl: float) -> None:
        self.id: int = lease.id
        self.ttl = ttl
        self.lost = threading.Event()
        self._etcd = etcd
        self._lease = lease
        self._task = etcd.submit(self._keep_alive())

    async def _keep_alive(self) -> None:
        """Refresh every third of the TTL (as etcd's own client does). A refresh that
        fails or is slow (a loaded machine) is tried again: the lease is lost only
        once a whole TTL has gone by since the last refresh that worked (etcd has
        dropped it by then), or when etcd says it expired."""
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                reply = await asyncio.wait_for(self._lease.refresh(), self.ttl / 3)
            except Exception as exc:  # unreachable, stopped, or the call timed out
                if time.monotonic() - last_ok < self.ttl:
                    log.debug("etcd lease %x: a keep-alive failed, trying again: %r", self.id, exc)
                    continue
                log.warning("etcd lease %x: no keep-alive for %gs: %s", self.id, self.ttl, exc or type(exc).__name__)
                self.lost.set()
                return
            if reply is None or reply.TTL <= 0:
                log.warning("etcd lease %x expired", self.id)
                self.lost.set()
                return
            last_ok = time.monotonic()

    def revoke(self) -> None:
        self._task.cancel()
        with contextlib.suppress(Exception):
            self._etcd.call(self._lease.revoke())


class Etcd:
    """One connection to an etcd member, used from any thread."""

    def __init__(self, endpoint: Endpoint, *, timeout: float = 2.0) -> None:
        aetcd = _aetcd()
        self.endpoint = endpoint
        self.timeout = timeout
        self._aetcd = aetcd
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="etcd", daemon=True)
        self._thread.start()
        self._client = aetcd.Client(endpoint.host, endpoint.port, timeout=timeout)
        self._watches: list[Any] = []
        self.call(self._client.connect())

    # -- plumbing ------------------------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the loop thread; its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """``coro``'s result, or :class:`EtcdUnavailable` after ``timeout``."""
        limit = self.timeout if timeout is None else timeout
        future = self.submit(asyncio.wait_for(coro, limit))
        try:
            return future.result(limit + 1)  # type: ignore[no-any-return]
        except TimeoutError:
            future.cancel()
            raise EtcdUnavailable(f"etcd at {self.endpoint} did not answer within {limit:g}s") from None
        except self._aetcd.exceptions.ClientError as exc:
            raise EtcdUnavailable(f"etcd at {self.endpoint}: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        for watch in self._watches:
            with contextlib.suppress(Exception):
                self.call(watch.cancel(), 1)
        with contextlib.suppress(Exception):
            self.call(self._client.close(), 2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- keys ----------------------------------------------------------------------

    def put(self, key: str, value: bytes, lease: Lease | None = None) -> int:
        """Set ``key``; the store's revision after it."""
        reply = self.call(self._client.put(key.encode(), value, lease=lease.id if lease else None))
        return int(reply.header.revision)

    def get(self, key: str) -> bytes | None:
        got = self.call(self._client.get(key.encode()))
        return None if got is None else bytes(got.value)

    def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` and the revision they were read at."""
        got = self.call(self._client.get_prefix(prefix.encode()))
        return {kv.key.decode("utf-8", "replace"): bytes(kv.value) for kv in got}, int(got.header.revision)

    def create(self, key: str, value: bytes, lease: Lease | None = None) -> bool:
        """Set ``key`` only if it does not exist; whether it was set."""
        tx = self._client.transactions
        ok, _ = self.call(
            self._client.transaction(
                compare=[tx.version(key.encode()) == 0],
                success=[tx.put(key.encode(), value, lease.id if lease else None)],
                failure=[],
            )
        )
        return bool(ok)

    def lease(self, ttl: float) -> Lease:
        """A lease of ``ttl`` seconds (etcd counts whole seconds: at least 1)."""
        seconds = max(1, round(ttl))
        return Lease(self, self.call(self._client.lease(seconds)), seconds)

    # -- watches -------------------------------------------------------------------

    def watch_prefix(self, prefix: str, start_revision: int, callback: WatchCallback) -> None:
        """Call ``callback`` from the loop thread for every change under ``prefix``
        from ``start_revision`` on (nothing between a read and its watch is missed);
        once with ``error`` if the watch breaks (etcd gone: the caller gives up)."""
        watch = self.call(self._client.watch_prefix(prefix.encode(), start_revision=start_revision))
        self._watches.append(watch)

        async def pump() -> None:
            try:
                async for event in watch:
                    kind = "put" if event.kind == "PUT" else "delete"
                    callback(kind, event.kv.key.decode("utf-8", "replace"), bytes(event.kv.value))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                callback("error", prefix, str(exc or type(exc).__name__).encode())
                return
            callback("error", prefix, b"the watch ended")

        self.submit(pump())
