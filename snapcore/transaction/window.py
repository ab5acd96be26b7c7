"""The freeze window (DESIGN steps 4 and 6 for the filesystems): freeze every target,
innermost level first and each level in parallel, and thaw them all in reverse,
always, however the window ends; the deadline watchdog thaws them if it runs long."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from snapcore.errors import DeadlineExceeded, SnapcoreError
from snapcore.log import get_logger
from snapcore.transaction.targets import TargetRun, describe
from snapcore.types import Phase

if TYPE_CHECKING:
    from snapcore.transaction.core import Transaction

log = get_logger("snapcore.transaction")


class FreezeWindow:
    """The filesystems' freeze window of one checkpoint."""

    def __init__(self, txn: Transaction) -> None:
        self.txn = txn
        #: the deadline passed: the watchdog thawed everything, the images are not trusted
        self.expired = False
        #: when the first target was frozen (Unix seconds; None: not yet)
        self.frozen_wall: float | None = None
        self._thawed_keys: list[str] = []
        self._thawed_lock = threading.Lock()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """``before_freeze`` → freeze (levels in order) → body → thaw (levels in
        reverse, always) → ``after_thaw``. The body (snapshots, live exports, the body
        of :meth:`Transaction.hold`) runs with every target frozen."""
        txn = self.txn
        assert txn.info is not None
        t = time.perf_counter()
        thaw_error: BaseException | None = None
        try:
            txn.plugins.before_freeze(txn.info)
            txn.phase(Phase.BEFORE_FREEZE, t)
            txn.watchdog.arm(txn.deadline_s, self._expire)
            start = time.perf_counter()
            self.frozen_wall = time.time()
            try:
                for level in txn.levels:
                    self._announce(level)
                    txn.each(level, Phase.FREEZE, self._freeze_one)
                yield
                self.check_deadline()
                txn.cancel.check()
            finally:
                thaw_error = self.thaw_all()
                end = time.perf_counter()
                txn.watchdog.disarm()
                txn.manifest.freeze_window_ms = round((end - start) * 1000, 3)
        finally:
            txn.manifest.warnings.extend(txn.plugins.after_thaw(txn.info))
        if thaw_error is not None:
            raise thaw_error
        self.check_deadline()

    def check_deadline(self) -> None:
        if self.expired:
            raise DeadlineExceeded(
                f"the freeze window outlived freeze_timeout ({self.txn.deadline_s:g}s); every target was thawed "
                "by the watchdog and the images are not trusted"
            )

    def _announce(self, level: Sequence[TargetRun]) -> None:
        """Intent first, once per level: a controller that dies from here on leaves a
        journal record and a guard that knows. One write and one message for the whole
        level: a guard woken once per target was measured to slow the parallel freezes
        (its CPU time lengthens the kernel's RCU waits inside FIFREEZE)."""
        runs = [r for r in level if r.rescue is not None and not r.dropped]
        if not runs:
            return
        self.txn.journal.record_many(
            [{"op": "freeze", "key": r.mount_point, "rescue": r.rescue.to_json()} for r in runs if r.rescue]
        )
        self.txn.watchdog.freezing(*(r.mount_point for r in runs))

    def _freeze_one(self, run: TargetRun) -> None:
        txn = self.txn
        if self.expired:
            raise DeadlineExceeded(f"freeze_timeout ({txn.deadline_s:g}s) passed before {run.mount_point} froze")
        txn.cancel.check()
        t = time.perf_counter()
        try:
            txn.plugins.freeze(run.target.imager, run.target)
        except BaseException:
            if run.rescue is not None:
                # not frozen by us (EBUSY: by someone else): nobody may thaw it for us.
                # A guard that died meanwhile thaws nothing either; its error must not
                # replace the freeze's own
                txn.journal.record("thawed", key=run.mount_point, failed=True)
                with contextlib.suppress(SnapcoreError):
                    txn.watchdog.thawed(run.mount_point)
            raise
        with run.lock:
            run.frozen = True
            late = self.expired
        run.time(Phase.FREEZE, t)
        if late:  # the watchdog went past this target while it was freezing
            self._thaw_one(run)
            self._flush_thawed()

    def _thaw_one(self, run: TargetRun) -> None:
        with run.lock:
            if not run.frozen:
                return
            run.frozen = False
        txn = self.txn
        t = time.perf_counter()
        try:
            txn.plugins.thaw(run.target.imager, run.target)
            if run.rescue is not None:
                with self._thawed_lock:
                    self._thawed_keys.append(run.mount_point)
        except BaseException as exc:
            run.record.error = f"thaw failed, the filesystem may still be frozen: {describe(exc)}"
            log.error("%s: thaw failed: %s", run.mount_point, describe(exc))
            txn.manifest.warnings.append(f"{run.mount_point}: THAW FAILED: {describe(exc)}")
            raise
        finally:
            run.time(Phase.THAW, t)

    def thaw_all(self) -> BaseException | None:
        """Thaw every frozen target, innermost level last, reverse order; never stops
        early. Returns the first failure."""
        first: BaseException | None = None
        for level in reversed(self.txn.levels):
            for run in reversed(level):
                try:
                    self._thaw_one(run)
                except BaseException as exc:
                    first = first or exc
        self._flush_thawed()
        return first

    def _flush_thawed(self) -> None:
        with self._thawed_lock:
            keys, self._thawed_keys = self._thawed_keys, []
        if keys:
            self.txn.journal.record_many([{"op": "thawed", "key": key} for key in keys])
            with contextlib.suppress(SnapcoreError):
                self.txn.watchdog.thawed(*keys)

    def _expire(self) -> None:
        """The deadline watchdog: thaw everything now; the transaction will fail."""
        self.expired = True
        log.error("freeze window exceeded %gs: thawing every target", self.txn.deadline_s)
        self.thaw_all()
