"""The checkpoint transaction (DESIGN steps 1-10), one module per step:

=================  ==========================================================
``select``         1. resolve: the mounts (named, the policy's, or the tasks'),
                   and the backends that image and export each
``core``           the :class:`Transaction`: its sequence, read top to bottom
                   in ``Transaction._sequence``; locks, journal, prepare,
                   finish, the manifest, and what is undone on failure
``tasks_step``     the tasks: readied and watched, frozen around the window,
                   the change check, their thaw
``window``         the filesystems' freeze window: freeze by level, thaw in
                   reverse (always), the deadline
``images``         snapshots, exports, their completion, their discard
``payload``        the caller's command (``-- CMD``; ``criu dump``)
``targets``        a target's state during the transaction; :class:`TaskSpec`
``pool``           the threads a level's targets run on in parallel
=================  ==========================================================

The end, in order and by these names only: **finish** (each backend completes what it
made: a checksum, a sync, a health check; may still fail the checkpoint) → **record**
(what was made goes into the targets' manifest records) → **manifest** (written; the
checkpoint exists) → ``checkpoint_end`` (observers; exporters *publish*: the manifest
copy beside the export and the ``latest`` pointer, only once the manifest says ok).

Three safety nets, three names: the **change watch** (:mod:`snapcore.tasks.changes`) notices
files the tasks need changing under them; the **deadline watchdog**
(:mod:`snapcore.safety.deadline`, a thread) thaws when the window outlives
``freeze_timeout``; the **guard** (:mod:`snapcore.safety.guard`, a process) thaws when the
controller dies.
"""

from __future__ import annotations

from snapcore.errors import ChangeDetected, PayloadFailed
from snapcore.transaction.core import Transaction
from snapcore.transaction.payload import Payload, check_payload
from snapcore.transaction.select import Selection, plan, resolve_mounts, select
from snapcore.transaction.targets import TargetRun, TaskSpec

__all__ = [
    "ChangeDetected",
    "Payload",
    "PayloadFailed",
    "Selection",
    "TargetRun",
    "TaskSpec",
    "Transaction",
    "check_payload",
    "plan",
    "resolve_mounts",
    "select",
]
