"""The manifest: a JSON record of every checkpoint, success or failure.

It is what ``list``, ``show``, ``restore``, ``verify`` and ``prune`` read, and it
travels with exports. Fields unknown to this version are kept as they are, so an
older snapcore survives a newer manifest.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from snapcore.errors import SnapcoreError, UsageError
from snapcore.host.tools import write_atomic

SCHEMA = 1
MANIFEST_NAME = "manifest.json"
_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # compiled on first use (re's cache)


def utc_now() -> str:
    """``2026-11-25T14:01:02.345Z`` (the time module: datetime costs ~1 ms to import)."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def new_checkpoint_id() -> str:
    """Sortable by time, unique enough: ``20261125T140102Z-1a2b``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(2).hex()


def check_checkpoint_id(value: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(_ID, value):  # fullmatch: "$" also matches before "\n"
        raise UsageError(
            f"bad checkpoint id {value!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return value


def checkpoints_dir(state_dir: Path) -> Path:
    return state_dir / "checkpoints"


def manifest_path(state_dir: Path, checkpoint_id: str) -> Path:
    return checkpoints_dir(state_dir) / check_checkpoint_id(checkpoint_id) / MANIFEST_NAME


def drop_ghosts(manifest: Manifest, state_dir: Path) -> None:
    """A failed checkpoint keeps no ghost copies (nothing can be restored from it):
    remove its ``ghosts`` directory and say so in each file's ``ghost``."""
    import shutil

    ghosts = manifest_path(state_dir, manifest.id).parent / "ghosts"
    if ghosts.is_dir() and not ghosts.is_symlink():
        shutil.rmtree(ghosts, ignore_errors=True)
    for f in manifest.files or ():
        ghost = f.get("ghost") if isinstance(f, dict) else None
        if isinstance(ghost, dict) and ghost.get("path"):
            ghost.update(path=None, sha256=None, note="removed: the checkpoint failed")


def _typed(data: Mapping[str, Any], key: str, types: tuple[type, ...]) -> Any:
    value = data[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"{key!r} is a {type(value).__name__}, not {names}")
    return value


@dataclass(slots=True, kw_only=True)
class TargetRecord:
    """One target's lines in the manifest."""

    mount: str
    source: str
    fstype: str
    imager: str | None
    exporter: str | None
    image: str | None = None
    export: str | None = None
    consistency: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    outcome: str = "failed"
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: The full image and export records, for restore/verify/discard.
    image_record: dict[str, Any] | None = None
    export_record: dict[str, Any] | None = None
    device: str | None = None
    #: The backends' validated options, so restore and prune need no policy.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep: dict[str, Any] | None = None
    #: The exporter's copying before the freeze (one record per round), None if none.
    precopy: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "mount": (str,),
        "source": (str,),
        "fstype": (str,),
        "imager": (str, type(None)),
        "exporter": (str, type(None)),
        "image": (str, type(None)),
        "export": (str, type(None)),
        "consistency": (str, type(None)),
        "timings": (dict,),
        "outcome": (str,),
        "error": (str, type(None)),
        "warnings": (list,),
        "image_record": (dict, type(None)),
        "export_record": (dict, type(None)),
        "device": (str, type(None)),
        "options": (dict,),
        "keep": (dict, type(None)),
        "precopy": (list, type(None)),
    }
    #: The known fields, in the order the manifest writes them.
    _FIELDS = tuple(_TYPES)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update({name: getattr(self, name) for name in self._FIELDS})
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TargetRecord:
        """A target record as read from a manifest (untrusted): ``ValueError`` when
        a known field has the wrong type."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a target is a {type(data).__name__}, not an object")
        known = {k: _typed(data, k, cls._TYPES[k]) for k in cls._FIELDS if k in data}
        extra = {k: v for k, v in data.items() if k not in cls._FIELDS}
        return cls(**known, extra=extra)


@dataclass(slots=True, kw_only=True)
class Manifest:
    """A checkpoint's manifest (DESIGN's minimum fields, and what later issues add)."""

    id: str
    outcome: str
    started: str
    finished: str | None = None
    error: str | None = None
    freeze_window_ms: float | None = None
    policy: str | None = None
    host: str = field(default_factory=lambda: os.uname().nodename)
    targets: list[TargetRecord] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    payload: dict[str, Any] | None = None
    #: The checkpointed tasks and how they were stopped (``--pid``/``--cgroup``).
    tasks: dict[str, Any] | None = None
    #: The open-file inventory of those tasks, with states and ghost copies.
    files: list[dict[str, Any]] | None = None
    #: What the change watch saw between the tasks' freeze and thaw.
    changes: list[dict[str, Any]] | None = None
    #: Opens of needed files for writing held back (``on_change: delay``) or refused
    #: (``deny``) while the tasks were frozen: path, device, inode, pid, tid,
    #: command, flags, action (``delayed``/``denied``), ``held_ms``, and for a delayed
    #: one why it was let go (``released``: thaw, deadline, error, controller gone).
    #: None: no hold ran.
    holds: list[dict[str, Any]] | None = None
    #: CRIU's image directory and command, when the payload was a CRIU dump.
    criu: dict[str, Any] | None = None
    #: A hand-off to another host (``checkpoint --hand-off``): ``state`` waiting,
    #: moved (the destination restored the program, the tasks here were ended) or
    #: kept (they were thawed here), with the destination's ``answer``.
    handoff: dict[str, Any] | None = None
    #: This node's part of a cluster checkpoint (``checkpoint --cluster``): the node's
    #: name, the coordinator, the instant it froze (``frozen_at``, Unix seconds), how
    #: long it waited for the others at each meeting point (``waited_ms``), and
    #: ``state``: ``committed`` (the coordinator's word) or ``pending`` (none heard).
    cluster: dict[str, Any] | None = None
    schema: int = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    _TYPES: ClassVar[dict[str, tuple[type, ...]]] = {
        "schema": (int,),
        "id": (str,),
        "outcome": (str,),
        "started": (str,),
        "finished": (str, type(None)),
        "error": (str, type(None)),
        "freeze_window_ms": (int, float, type(None)),
        "policy": (str, type(None)),
        "host": (str,),
        "timings": (dict,),
        "warnings": (list,),
        "payload": (dict, type(None)),
        "tasks": (dict, type(None)),
        "files": (list, type(None)),
        "changes": (list, type(None)),
        "holds": (list, type(None)),
        "criu": (dict, type(None)),
        "handoff": (dict, type(None)),
        "cluster": (dict, type(None)),
    }
    #: The known fields, in the order the manifest writes them.
    _FIELDS = tuple(_TYPES)

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update({name: getattr(self, name) for name in self._FIELDS})
        data["targets"] = [t.to_json() for t in self.targets]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """A manifest as read from a file (untrusted): ``ValueError`` when it is no
        manifest, or a known field has the wrong type."""
        if not isinstance(data, Mapping) or "id" not in data:
            raise ValueError("not a snapcore manifest")
        known = {k: _typed(data, k, cls._TYPES[k]) for k in cls._FIELDS if k in data}
        extra = {k: v for k, v in data.items() if k not in cls._FIELDS and k != "targets"}
        targets = _typed(data, "targets", (list, type(None))) or ()
        return cls(**known, targets=[TargetRecord.from_json(t) for t in targets], extra=extra)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    def write(self, state_dir: Path) -> Path:
        """Write atomically (temporary file, fsync, rename) and return the path."""
        from snapcore.host.fsutil import secure_dir

        path = manifest_path(state_dir, self.id)
        secure_dir(state_dir)  # nothing is created in a state dir someone else controls
        secure_dir(path.parent.parent)
        path.parent.mkdir(exist_ok=True, mode=0o700)
        if path.parent.is_symlink():  # never follow a link planted in the state dir
            raise SnapcoreError(f"{path.parent} is a symlink: refusing to write through it")
        write_atomic(path, self.dumps().encode("utf-8"), mode=0o600)
        return path

    def summary(self, *, with_error: bool = True) -> str:
        """Lines for a person. ``with_error=False`` leaves the checkpoint's error out
        (and a target's error that only repeats it), for a command that prints that
        error on stderr anyway."""
        lines = [
            f"checkpoint {self.id}: {self.outcome}"
            + (f" — {self.error}" if self.error and with_error else "")
            + (f" (freeze window {self.freeze_window_ms:.1f} ms)" if self.freeze_window_ms is not None else "")
        ]
        for t in self.targets:
            what = t.imager or "-"
            if t.exporter:
                what += f"+{t.exporter}"
            line = f"  {t.mount:<24} {t.fstype:<6} {what:<16} {t.outcome:<7} {t.consistency or '-'}"
            if t.image:
                line += f" image={t.image}"
            if t.export:
                line += f" export={t.export}"
            if t.error and (with_error or t.error not in (self.error or "")):
                line += f" error: {t.error}"
            lines.append(line)
            lines.extend(f"    warning: {w}" for w in t.warnings)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        for hold in self.holds or ():
            if isinstance(hold, dict):  # a manifest read from a file: shown as it says, never trusted further
                action, command, pid, path, flags, ms = (
                    _shown(hold.get(k)) for k in ("action", "command", "pid", "path", "flags", "held_ms")
                )
                lines.append(f"  {action}: {command} (pid {pid}) opening {path} {flags}, {ms} ms")
        if self.handoff:
            state = self.handoff.get("state")
            answer = self.handoff.get("answer") if isinstance(self.handoff.get("answer"), dict) else {}
            said = f": {answer.get('reason')}" if answer and answer.get("reason") else ""
            what = {
                "waiting": "hand-off: waiting for the destination to restore",
                "moved": "hand-off: the destination restored the program; its tasks here were ended",
                "kept": "hand-off: not moved, the program runs on here",
            }.get(str(state), f"hand-off: {state}")
            lines.append(f"  {what}{said}")
        return "\n".join(lines)


#: A manifest larger than this is refused (an inventory of 100k files takes ~40 MB).
MAX_MANIFEST_BYTES = 256 << 20


def read_manifest(path: Path, *, owned: bool = False) -> Manifest:
    """Read a manifest: from a state directory (``owned``: it must be root's and
    writable by nobody else) or an export's copy (from anywhere). Untrusted input
    either way: a regular file (never a FIFO, device or symlink), size-capped."""
    from snapcore.host.fsutil import read_regular

    try:
        data = json.loads(read_regular(path, MAX_MANIFEST_BYTES, owned=owned))
        return Manifest.from_json(data)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such manifest") from None
    except OSError as exc:
        raise SnapcoreError(f"{path}: cannot read the manifest: {exc.strerror or exc}") from None
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise SnapcoreError(f"{path}: unreadable manifest: {exc}") from None


def load(state_dir: Path, checkpoint_id: str) -> Manifest:
    path = manifest_path(state_dir, checkpoint_id)
    if not path.exists():
        raise UsageError(f"no checkpoint {checkpoint_id!r} in {checkpoints_dir(state_dir)}")
    return read_manifest(path, owned=True)


def iter_manifests(state_dir: Path) -> Iterator[tuple[Path, Manifest | None, str | None]]:
    """Every manifest under ``state_dir``, newest first; unreadable ones with an error."""
    root = checkpoints_dir(state_dir)
    if not root.is_dir():
        return
    entries = []
    for child in root.iterdir():
        path = child / MANIFEST_NAME
        if child.is_dir() and not child.is_symlink() and path.is_file():
            entries.append(path)
    parsed: list[tuple[Path, Manifest | None, str | None]] = []
    for path in entries:
        try:
            parsed.append((path, read_manifest(path, owned=True), None))
        except SnapcoreError as exc:
            parsed.append((path, None, str(exc)))
    parsed.sort(key=lambda e: (e[1].started if e[1] else "", e[0].parent.name), reverse=True)
    yield from parsed


def _shown(value: object) -> str:
    """A value read from a manifest, fit for a terminal (no control characters)."""
    text = str(value)[:300]
    return "".join(c if c.isprintable() else "?" for c in text)
