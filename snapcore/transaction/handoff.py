"""Moving a checkpointed program to another host (``checkpoint --send-images`` and
``--hand-off``): CRIU's images travel in the export directory, and the tasks stay
frozen here until the destination says it restored them.

With ``--hand-off``, ``criu dump`` runs with ``--leave-running``: CRIU leaves the
tasks as it found them, frozen by snapcore. Once the checkpoint is complete (its
manifest copy published beside the export, which is what the destination waits for),
the controller reads the destination's answer (``handoff.json``, written there by
``snapcore restore --from``) until the deadline: *restored* → the tasks here are
ended (SIGKILL, then thawed: they never run again); anything else (a failed restore,
a check that found the files differ, silence) → they are thawed and the program goes
on here. The guard stays armed all along: a controller that dies while it waits
leaves the tasks thawed, never frozen.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore.errors import SnapcoreError, UsageError
from snapcore.store.export_files import (
    GHOSTS_NAME,
    HANDOFF_LIMIT,
    HANDOFF_NAME,
    IMAGES_NAME,
    Answer,
    parse_answer,
)
from snapcore.store.manifest import manifest_path
from snapcore.transaction.targets import describe

if TYPE_CHECKING:
    from snapcore.transaction.core import Transaction
    from snapcore.transaction.tasks_step import Held


#: How often the destination's answer is read while the tasks are held.
POLL_S = 0.05
#: The local deadline thread thaws the held tasks this long after the hand-off's own
#: deadline, should the controller hang in a read that does not return.
GRACE_S = 5.0


def check_request(send_images: bool, hand_off: float | None, payload: Any, tasks: Any) -> None:
    """Refuse, before anything is frozen, what ``--send-images``/``--hand-off`` cannot do."""
    if not send_images and hand_off is None:
        return
    if tasks is not None and tasks.stopped_by == "CRIU":
        # a runtime's dump, reached at its post-dump action: CRIU wrote its images there
        if not tasks.criu_images:
            raise UsageError("--send-images and --hand-off need CRIU's image directory, which CRIU did not name")
    else:
        argv = list(payload) if payload is not None and not callable(payload) else []
        if not argv or os.path.basename(argv[0]) != "criu" or "dump" not in argv[1:]:
            raise UsageError("--send-images and --hand-off need '-- criu dump ... -D DIR' as the command")
    if hand_off is not None:
        if tasks is None or tasks.stopped_by not in (None, "CRIU"):
            raise UsageError("--hand-off holds the checkpoint's tasks: give --pid, --cgroup or --container")
        if hand_off <= 0:
            raise UsageError("--hand-off needs a time greater than 0")


def send_images(txn: Transaction) -> None:
    """CRIU's image directory, and the ghost copies of the tasks' deleted and
    renamed-over files, into each export directory (once per directory)."""
    criu = txn.manifest.criu or {}
    images = criu.get("images_dir")
    if not images or not os.path.isdir(images):
        raise SnapcoreError(f"--send-images: CRIU's image directory {images or '(none named)'} is not there")
    sent: list[dict[str, Any]] = []
    seen: set[str] = set()
    for run in txn.active:
        exporter = run.target.exporter
        if run.export is None or exporter is None or str(run.export.path) in seen:
            continue
        seen.add(str(run.export.path))
        parts = {IMAGES_NAME: Path(images)}
        ghosts = manifest_path(txn.state_dir, txn.id).parent / GHOSTS_NAME
        if ghosts.is_dir() and not ghosts.is_symlink() and any(ghosts.iterdir()):
            parts[GHOSTS_NAME] = ghosts  # the check at the destination reads them there
        # named before the copy: a discard after a failure removes what it began
        put = [*run.export.details.get("put", ()), *parts]
        run.export = dataclasses.replace(run.export, details={**run.export.details, "put": put})
        done = txn.plugins.export_put(exporter, run.target, run.export, parts)
        sent.append({"mount": run.mount_point, "export": run.export.path, "parts": list(parts), **done})
    if not sent:
        raise SnapcoreError("--send-images: no target has an export to carry CRIU's images")
    txn.manifest.criu = {**criu, "sent": sent}


class HandOff:
    """The tasks kept frozen after a complete checkpoint, until the destination answers."""

    def __init__(self, txn: Transaction, timeout_s: float) -> None:
        self.txn = txn
        self.timeout_s = timeout_s

    def waiting(self) -> dict[str, Any]:
        """What the manifest (and its copy at the destination) says before the answer."""
        return {"state": "waiting", "timeout_s": self.timeout_s}

    def decide(self, freezer: Held) -> tuple[bool, Answer]:
        """Wait for the answer, the tasks frozen; restored → end them (they die when
        thawed). Returns whether they were ended, and the answer (a failure to wait is
        one that says why). Arms the local deadline: the caller thaws, then disarms."""
        try:
            self.txn.watchdog.arm(self.timeout_s + GRACE_S, freezer.thaw)
            answer = self._wait()
            if answer.restored:
                freezer.end()
                return True, answer
            return False, answer
        except Exception as exc:
            return False, Answer(False, f"waiting for the destination's answer failed: {describe(exc)}")

    def record(self, ended: bool, answer: Answer | None, since: float) -> None:
        """Once the tasks are thawed: the manifest's ``handoff``, written."""
        txn = self.txn
        record: dict[str, Any] = {
            "state": "moved" if ended else "kept",
            "timeout_s": self.timeout_s,
            "waited_ms": round((time.monotonic() - since) * 1000, 3),
        }
        if answer is not None:
            record["answer"] = answer.to_json()
        tasks = txn.tasks
        if tasks is not None and tasks.stopped_at is not None:
            record["stopped_ms"] = round((time.monotonic() - tasks.stopped_at) * 1000, 3)
        if ended and answer is not None and answer.at is not None and tasks and tasks.stopped_wall:
            # frozen here until running there, by the two hosts' clocks (as close as
            # their time sync): the program's downtime
            record["downtime_ms"] = round((answer.at - tasks.stopped_wall) * 1000, 3)
        txn.manifest.handoff = record
        txn.manifest.write(txn.state_dir)

    def _wait(self) -> Answer:
        txn = self.txn
        deadline = time.monotonic() + self.timeout_s
        run = next((r for r in txn.active if r.export is not None and r.target.exporter), None)
        if run is None or run.export is None or run.target.exporter is None:
            return Answer(False, "no export to hand over")
        last_error = None
        while True:
            try:
                raw = txn.plugins.export_get(run.target.exporter, run.target, run.export, HANDOFF_NAME, HANDOFF_LIMIT)
                last_error = None
            except SnapcoreError as exc:  # unreachable for now: ask again until the deadline
                raw, last_error = None, describe(exc)
            if raw is not None:
                return parse_answer(raw, txn.id)
            if time.monotonic() >= deadline:
                why = f" (last: {last_error})" if last_error else ""
                return Answer(False, f"no answer from the destination within {self.timeout_s:g} s{why}")
            txn.cancel.check()
            time.sleep(POLL_S)
