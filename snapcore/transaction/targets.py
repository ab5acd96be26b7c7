"""What one checkpoint keeps per target while it runs, and what its tasks are."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from snapcore.errors import SnapcoreError
from snapcore.store.manifest import TargetRecord
from snapcore.types import Export, Image, Phase, Rescue, Target


def describe(exc: BaseException) -> str:
    """An error in words for a manifest: a :class:`SnapcoreError`'s own message, else
    its type and message (a bug in a plugin still says what it was)."""
    if isinstance(exc, SnapcoreError):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


@dataclass(slots=True, kw_only=True)
class TargetRun:
    """A target's mutable state during one transaction: its record in the manifest,
    what was made of it, whether it is frozen now."""

    target: Target
    record: TargetRecord
    #: the imager's image is the live filesystem (fsfreeze): an exporter copies it
    #: inside the freeze window
    live: bool = False
    image: Image | None = None
    export: Export | None = None
    frozen: bool = False
    #: not required and failed: the checkpoint goes on without it
    dropped: bool = False
    rescue: Rescue | None = None
    #: the exporter copied the live mount ahead (``precopy``): until the export, what
    #: it wrote is removed by ``discard_partial`` on failure
    precopied: bool = False
    prepared: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def mount_point(self) -> str:
        return self.target.mount.mount_point

    def time(self, phase: Phase, start: float) -> None:
        self.record.timings[phase.value] = round((time.perf_counter() - start) * 1000, 3)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskSpec:
    """The tasks of a checkpoint: a process and its descendants, or a cgroup."""

    pid: int | None = None
    cgroup: str | None = None
    #: Someone else already stopped the tasks (``"CRIU"`` in an action script):
    #: they are inventoried and watched, not frozen again.
    stopped_by: str | None = None
    #: CRIU's image directory, for the manifest.
    criu_images: str | None = None
    #: How CRIU reached snapcore, for the manifest (``criu.via``).
    criu_via: str = "action-script"
    #: The container the tasks are, as its runtime names it (``runc:ID``), for the
    #: manifest (``tasks.container``).
    container: str | None = None
