"""Files that travel in an export directory beside the exporter's own: CRIU's images
(``checkpoint --send-images``), and the destination's answer to a hand-off
(``handoff.json``, written by ``restore --from`` on the other host).

An exporter may move them itself (``snapcore_export_put``/``snapcore_export_get``:
the rsync exporter does, to a remote destination); when it does not, and its export
directory is local, the core copies and reads there itself (:func:`put_local`,
:func:`get_local`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore.errors import SnapcoreError
from snapcore.host.fsutil import read_regular, syncfs
from snapcore.host.tools import write_atomic
from snapcore.store.manifest import MANIFEST_NAME
from snapcore.types import Export

#: The directory of CRIU's images in an export directory (``restore --from DIR --
#: criu restore`` adds ``-D DIR/criu`` when the command names no image directory).
IMAGES_NAME = "criu"
#: The ghost copies of the tasks' deleted and renamed-over files, sent with the images.
GHOSTS_NAME = "ghosts"
#: The destination's answer to a hand-off, in the export directory.
HANDOFF_NAME = "handoff.json"
#: An answer is a few hundred bytes; more is not one.
HANDOFF_LIMIT = 64 << 10


#: In the directory the core puts files into: the id of the checkpoint they are of
#: (what a delete, reading an untrusted manifest, checks before removing them).
SENT_MARKER = ".snapcore-sent"
#: What the core ever puts into an export directory: a manifest naming anything else
#: removes nothing.
PUT_NAMES = (IMAGES_NAME, GHOSTS_NAME)


def own_dir(export_dir: Path, checkpoint_id: str) -> Path:
    """Where the core puts a checkpoint's files in a local export directory: that
    directory when it is the checkpoint's own (tar and rsync export into ``DEST/ID``),
    else a directory named after the checkpoint in it (btrfs send's streams of every
    checkpoint share ``DEST``: one checkpoint's images never replace another's)."""
    return export_dir if export_dir.name == checkpoint_id else export_dir / checkpoint_id


def put_local(export_dir: Path, checkpoint_id: str, parts: Mapping[str, Path]) -> dict[str, Any]:
    """Copy each directory of ``parts`` to ``NAME`` in the checkpoint's own directory
    of ``export_dir`` (:func:`own_dir`; under a hidden temporary name, renamed when
    whole), then one sync. Returns ``files``, ``bytes``, ``ms`` and ``dir``."""
    t = time.perf_counter()
    if not export_dir.is_dir():
        raise SnapcoreError(f"{export_dir}: no such export directory to copy {', '.join(parts)} into")
    own = own_dir(export_dir, checkpoint_id)
    files = nbytes = 0
    try:
        own.mkdir(mode=0o700, exist_ok=True)
        write_atomic(own / SENT_MARKER, (checkpoint_id + "\n").encode(), mode=0o600)
    except OSError as exc:
        raise SnapcoreError(f"cannot copy {', '.join(parts)} into {own}: {exc.strerror or exc}") from exc
    for name, source in parts.items():
        final, part = own / name, own / f".{name}.part"
        remove_local(own, name)
        try:
            shutil.copytree(source, part, symlinks=True)
            os.rename(part, final)
        except OSError as exc:
            shutil.rmtree(part, ignore_errors=True)
            raise SnapcoreError(f"cannot copy {source} into {own}: {exc.strerror or exc}") from exc
        n, size = tree_size(final)
        files, nbytes = files + n, nbytes + size
    syncfs(export_dir)
    return {"files": files, "bytes": nbytes, "ms": round((time.perf_counter() - t) * 1000, 3), "dir": str(own)}


def remove_local(export_dir: Path, name: str) -> None:
    """Remove ``name`` and its temporary copy from ``export_dir`` (idempotent)."""
    for path in (export_dir / f".{name}.part", export_dir / name):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)


def remove_put(export: Export, checkpoint_id: str) -> list[str]:
    """Undo :func:`put_local` for a checkpoint whose export is discarded or deleted
    (the exporter's own discard does not know these files), from what its (untrusted)
    manifest says: only :data:`PUT_NAMES`, only in a local directory whose marker names
    this checkpoint; the directory goes when that leaves it empty. Returns what was
    removed (nothing: nothing there was ours)."""
    export_path, names = export.path or "", export.details.get("put") or []
    if not os.path.isabs(export_path) or not isinstance(names, list | tuple):
        return []
    own = own_dir(Path(export_path), checkpoint_id)
    if own.is_symlink():
        return []
    try:
        if read_regular(own / SENT_MARKER, 4096).decode("utf-8", "replace").strip() != checkpoint_id:
            return []
    except (OSError, SnapcoreError):  # none, or not a regular file: nothing here is ours
        return []
    removed = []
    for name in dict.fromkeys(n for n in names if n in PUT_NAMES):
        remove_local(own, name)
        removed.append(str(own / name))
    if any(os.path.lexists(own / n) or os.path.lexists(own / f".{n}.part") for n in PUT_NAMES):
        return removed
    with contextlib.suppress(FileNotFoundError):
        (own / SENT_MARKER).unlink()
    try:
        left = os.listdir(own)
    except OSError:
        return removed
    # the exporter's files gone (it discarded first), a manifest copy alone describes
    # nothing: the exporters leave it for last for the same reason
    if all(n == MANIFEST_NAME or n.startswith(".") for n in left):
        with contextlib.suppress(FileNotFoundError):
            (own / MANIFEST_NAME).unlink()
        with contextlib.suppress(OSError):  # an exporter's hidden file left: not ours to remove
            own.rmdir()
    return removed


def get_local(export_dir: Path, checkpoint_id: str, name: str, limit: int) -> bytes | None:
    """``name``'s bytes in the checkpoint's own directory of ``export_dir`` (a regular
    file, at most ``limit``), None if absent."""
    try:
        return read_regular(own_dir(export_dir, checkpoint_id) / name, limit)
    except FileNotFoundError:
        return None


def tree_size(root: Path) -> tuple[int, int]:
    """Regular files under ``root`` and their bytes (symlinks not followed)."""
    files = nbytes = 0
    for path, _dirs, names in os.walk(root):
        for n in names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(path, n))
                if stat.S_ISREG(st.st_mode):
                    files += 1
                    nbytes += st.st_size
    return files, nbytes


# -- the hand-off answer ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What the destination said about a hand-off."""

    #: True: it restored the checkpoint and the program runs there.
    restored: bool
    reason: str
    #: the destination's wall clock when it answered (``time.time()``), if it said
    at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"outcome": "restored" if self.restored else "failed", "reason": self.reason, "at": self.at}


def write_answer(export_dir: Path, checkpoint_id: str, restored: bool, reason: str) -> None:
    """The destination's answer, written atomically into the export directory."""
    data = {"checkpoint": checkpoint_id, "outcome": "restored" if restored else "failed", "reason": reason}
    write_atomic(export_dir / HANDOFF_NAME, (json.dumps({**data, "at": time.time()}) + "\n").encode())


def parse_answer(raw: bytes, checkpoint_id: str) -> Answer:
    """An answer read from another host: untrusted. Only a well-formed one for this
    checkpoint that says ``restored`` counts as restored; anything else is a failure
    whose reason says what was wrong with it."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return Answer(False, "the destination's answer is not JSON")
    if not isinstance(data, Mapping):
        return Answer(False, "the destination's answer is not a JSON object")
    if data.get("checkpoint") != checkpoint_id:
        return Answer(False, "the destination's answer is for another checkpoint")
    reason = data.get("reason")
    reason = "".join(c if c.isprintable() else "?" for c in reason[:500]) if isinstance(reason, str) else ""
    at = data.get("at")
    when = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) and at == at else None
    outcome = data.get("outcome")
    if outcome == "restored":
        return Answer(True, reason or "restored", when)
    if outcome == "failed":
        return Answer(False, reason or "the destination failed to restore", when)
    return Answer(False, "the destination's answer has no outcome 'restored' or 'failed'")
