"""Typed records that cross the hook boundary.

Every record is a frozen, slotted, keyword-only dataclass: plugins receive and
return these, never bare dicts, so a field added later does not break them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from snapcore.safety.cancel import Cancel

EMPTY: Mapping[str, Any] = MappingProxyType({})


class Role(StrEnum):
    """What a backend can do for a target."""

    IMAGER = "imager"
    EXPORTER = "exporter"


class Consistency(StrEnum):
    """How far an image can be trusted, stated honestly in the manifest."""

    #: One point in time for the whole target (a snapshot of a device or subvolume).
    ATOMIC = "atomic"
    #: Copied while the filesystem was frozen: every write before, none after.
    FS_FROZEN = "fs-frozen"
    #: Synced and frozen at the checkpoint instant, but nothing was kept.
    QUIESCED = "quiesced"
    #: A snapshot taken without freezing the filesystem: as after a power cut.
    CRASH_CONSISTENT = "crash-consistent"
    #: A snapshot taken without freezing the filesystem but while the checkpointed
    #: tasks were stopped (by snapcore or CRIU): all they wrote is in, none of their
    #: writes raced it; other processes' writes may have, as after a power cut.
    TASKS_FROZEN = "tasks-frozen"
    #: A live tree copied while the tasks were frozen; the change watch judges it.
    LIVE_COPY = "live-copy"


class Outcome(StrEnum):
    """How a checkpoint, or one target of it, ended."""

    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class Phase(StrEnum):
    """Phases of the checkpoint transaction, in order (used in timings and errors)."""

    RESOLVE = "resolve"
    SELECT = "select"
    PREPARE = "prepare"
    PRECOPY = "precopy"
    BEFORE_FREEZE = "before_freeze"
    FREEZE = "freeze"
    SNAPSHOT = "snapshot"
    THAW = "thaw"
    AFTER_THAW = "after_thaw"
    PAYLOAD = "payload"
    EXPORT = "export"
    SEND_IMAGES = "send_images"
    FINISH = "finish"
    DISCARD = "discard"
    MANIFEST = "manifest"
    END = "end"


class OptionKind(StrEnum):
    """Value types a backend option may declare."""

    STR = "string"
    INT = "integer"
    BOOL = "boolean"
    PATH = "absolute path"
    DURATION = "duration"
    CHOICE = "choice"


@dataclass(frozen=True, slots=True, kw_only=True)
class Mount:
    """One line of ``/proc/self/mountinfo``, enriched with the device behind it."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]
    #: Block device node (``/dev/loop3``), when the filesystem sits on one.
    devnode: str | None = None
    #: Backing file of a loop device.
    loop_backing_file: str | None = None
    #: device-mapper name and uuid (``vg-lv``, ``LVM-...``).
    dm_name: str | None = None
    dm_uuid: str | None = None

    @property
    def dev(self) -> int:
        """The ``st_dev`` of files on this mount."""
        return os.makedev(self.major, self.minor)

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options

    def super_option(self, name: str) -> str | None:
        """Value of a superblock option such as btrfs ``subvol``; ``""`` for a flag."""
        prefix = name + "="
        for opt in self.super_options:
            if opt == name:
                return ""
            if opt.startswith(prefix):
                return opt[len(prefix) :]
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendInfo:
    """What a backend says about itself (``snapcore_backend_info``)."""

    name: str
    roles: frozenset[Role]
    description: str
    #: The imager holds the live filesystem frozen from ``freeze`` to ``thaw`` and
    #: its image is that live tree: exporters must copy it inside the window.
    live_image: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Support:
    """A backend's answer to ``snapcore_probe``: can it image this mount, and why."""

    ok: bool
    reason: str
    #: Higher wins in ``auto`` selection (a snapshot beats a freeze); 0 means
    #: usable when a policy names the backend, never chosen by ``auto``.
    score: int = 0

    @classmethod
    def yes(cls, reason: str, score: int = 50) -> Support:
        return cls(ok=True, reason=reason, score=score)

    @classmethod
    def no(cls, reason: str) -> Support:
        return cls(ok=False, reason=reason, score=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One per-mount option a backend accepts under ``options: {backend: {...}}``."""

    name: str
    kind: OptionKind
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] = ()


class RescueKind(StrEnum):
    """How a process other than the controller thaws a target."""

    #: FITHAW on a directory of the mount (the guard opens it before the freeze).
    FITHAW = "fithaw"
    #: Run a command (e.g. ``dmsetup resume NAME``).
    COMMAND = "command"
    #: Write ``value`` to the file ``path`` (a cgroup's ``cgroup.freeze``: ``0``).
    WRITE = "write"
    #: Let go every open a fanotify permission group holds (``on_change: delay``):
    #: the guard gets copies of ``fds`` (the group's, then the change watch's
    #: groups'), removes the group's marks, allows what is queued and what the
    #: process ``value`` (its pid: the group's reader) read, and closes them all,
    #: the group first.
    #: Nothing is left for ``recover``: the kernel allows every pending open once
    #: the last descriptor is closed.
    FANOTIFY = "fanotify"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rescue:
    """What the out-of-process guard and ``snapcore recover`` do to thaw a target."""

    kind: RescueKind
    path: str | None = None
    argv: tuple[str, ...] = ()
    value: str | None = None
    #: Descriptors handed to the guard (``FANOTIFY``); never written anywhere.
    fds: tuple[int, ...] = field(default=(), compare=False, repr=False)
    #: Frozen from the moment the guard holds it, until this ``CLOCK_MONOTONIC``
    #: time at the latest (``FANOTIFY``: the hold's end).
    until: float | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind.value, "path": self.path, "argv": list(self.argv)}
        data["value"] = self.value
        if self.until is not None:
            data["until"] = self.until
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rescue:
        return cls(
            kind=RescueKind(data["kind"]),
            path=data.get("path"),
            argv=tuple(data.get("argv") or ()),
            value=data.get("value"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Keep:
    """Retention for a mount: the newest ``last`` images and/or those ``within`` s."""

    last: int | None = None
    within: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A mount with its chosen imager, optional exporter and their options."""

    checkpoint_id: str
    mount: Mount
    imager: str
    exporter: str | None = None
    #: Validated options, keyed by backend name.
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: EMPTY)
    required: bool = True
    freeze_timeout: float = 10.0
    keep: Keep | None = None
    state_dir: Path = Path("/var/lib/snapcore")
    #: The checkpoint's cancellation, shared by its targets: a backend running a long
    #: command registers a callback that stops it (:meth:`Cancel.on_cancel`).
    cancel: Cancel = field(default_factory=Cancel, compare=False, repr=False)
    #: Each backend's own state for this target during one checkpoint (see
    #: :meth:`state_of`); never compared, printed or written anywhere.
    scratch: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False, repr=False)

    def options_for(self, backend: str) -> Mapping[str, Any]:
        """Options of one backend for this target (defaults filled in)."""
        return self.options.get(backend, EMPTY)

    def state_of(self, backend: str) -> dict[str, Any]:
        """``backend``'s own mutable state for this target, kept from ``prepare`` to
        ``checkpoint_end`` of one checkpoint (what ``prepare`` planned for
        ``snapshot``, a descriptor ``freeze`` holds for ``thaw``): the same
        :class:`Target` object reaches every hook of one checkpoint, and
        :attr:`Checkpoint.targets` holds them for the observer hooks. A target
        rebuilt from a manifest (restore, verify, delete, recover) starts empty."""
        return self.scratch.setdefault(backend, {})

    @property
    def checkpoint_dir(self) -> Path:
        """``STATE/checkpoints/ID``: where this checkpoint's manifest lives."""
        return self.state_dir / "checkpoints" / self.checkpoint_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """A point-in-time image an imager made (``snapcore_snapshot``)."""

    backend: str
    #: Backend-defined reference (a snapshot path, an LV name); None: nothing kept.
    ref: str | None
    consistency: Consistency
    #: Where an exporter reads the image from (a snapshot path, the frozen mount).
    path: str | None = None
    #: The image is the live filesystem, readable only while it stays frozen.
    live: bool = False
    details: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "ref": self.ref,
            "consistency": self.consistency.value,
            "path": self.path,
            "live": self.live,
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Image:
        """From a manifest's ``image_record`` (untrusted: ``ValueError`` when a field
        has the wrong type)."""
        return cls(
            backend=_str(data, "backend"),
            ref=_str(data, "ref", optional=True),
            consistency=Consistency(data["consistency"]),
            path=_str(data, "path", optional=True),
            live=bool(data.get("live", False)),
            details=_details(data),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Restored:
    """What ``snapcore_restore`` did, when there is more to say than one line.

    ``set_aside`` is the state an in-place restore replaced, when the backend kept it
    as an image of its own (a btrfs rollback keeps the previous subvolume, as
    ``snapper rollback`` does): snapcore records it as a checkpoint with the id
    ``set_aside_id``, so that ``list``, ``show``, ``restore``, ``keep``/``prune`` and
    ``delete`` see it like any other.
    """

    message: str
    set_aside: Image | None = None
    set_aside_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Export:
    """A copy of an image that an exporter wrote (``snapcore_export``)."""

    backend: str
    ref: str
    path: str | None = None
    details: Mapping[str, Any] = field(default_factory=lambda: EMPTY)

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "ref": self.ref, "path": self.path, "details": dict(self.details)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Export:
        """From a manifest's ``export_record`` (untrusted, as :meth:`Image.from_json`)."""
        return cls(
            backend=_str(data, "backend"),
            ref=_str(data, "ref"),
            path=_str(data, "path", optional=True),
            details=_details(data),
        )


def _str(data: Mapping[str, Any], key: str, *, optional: bool = False) -> Any:
    value = data.get(key) if optional else data[key]
    if not isinstance(value, str) and not (optional and value is None):
        raise ValueError(f"{key!r} is a {type(value).__name__}, not a string")
    return value


def _details(data: Mapping[str, Any]) -> Mapping[str, Any]:
    details = data.get("details") or {}
    if not isinstance(details, Mapping):
        raise ValueError(f"'details' is a {type(details).__name__}, not an object")
    return MappingProxyType(dict(details))


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageEntry:
    """One image found by ``snapcore_list_images`` (for ``list`` and ``prune``)."""

    backend: str
    ref: str
    checkpoint_id: str | None
    created: float | None = None
    #: Health problems a person must see in ``list`` (an overflowed, invalid dm
    #: snapshot; a COW nearly full); empty when the image is fine.
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """The transaction as observer hooks see it."""

    id: str
    targets: tuple[Target, ...]
    policy: str | None
    state_dir: Path
    started: str
