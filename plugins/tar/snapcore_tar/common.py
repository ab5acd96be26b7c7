"""What the tar and rsync exporters share: the layout of an export directory, tools,
atomic writes, the sidecar files that let an export be restored on its own, and
the empty directory a restore writes into.

An export destination ``DEST`` holds one directory per checkpoint::

    DEST/
      <slug>.latest                  id of the newest complete export of that mount
      <checkpoint-id>/
        manifest.json                copy of the checkpoint's manifest (written last)
        <slug>.export.json           what this export is: backend, level, chain, sizes
        <slug>.tar[.gz|.zst]         tar: the archive          rsync: <slug>/ the tree
        <slug>.tar[.gz|.zst].sha256  tar: its checksum         rsync: <slug>.files, the file list
        <slug>.snar                  tar --listed-incremental snapshot (incremental only)

``slug`` names the mount point: ``/srv/db`` → ``srv-db``, ``/`` → ``-``; a ``-``
or any byte outside ``[A-Za-z0-9._]`` is written ``%XX``, so two mounts never
share a slug.

An export is written in two steps. ``export`` (inside the freeze window when the
image is the live, frozen filesystem) only copies: the archive or tree under a
temporary name, renamed when whole, and ``export.json``. ``finish``, called from
``snapcore_checkpoint_end`` once the checkpoint succeeded and its manifest is
written, adds what would slow the copy down: the sha256 (read back from the page
cache) or the file list, one ``syncfs``, then the manifest copy and the
``latest`` pointer. An export is complete only when ``manifest.json`` is there;
a failed checkpoint has its exports discarded, a crash leaves them without it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore import (
    BackendError,
    Checkpoint,
    Export,
    Outcome,
    SnapcoreError,
    Target,
    find_tool,
    plain_name,
    read_regular,
    stderr_tail,
    write_atomic,
)

if TYPE_CHECKING:
    from snapcore import Manifest

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
MANIFEST_NAME = "manifest.json"
#: tool → Debian package that provides it
PACKAGES = {"tar": "tar", "rsync": "rsync", "zstd": "zstd", "gzip": "gzip"}


def slug(mount_point: str) -> str:
    """A file name for ``mount_point`` that no other mount point maps to."""
    path = mount_point.strip("/")
    if not path:
        return "-"
    out: list[str] = []
    for i, part in enumerate(path.split("/")):
        if i:
            out.append("-")
        for j, byte in enumerate(os.fsencode(part)):
            ch = chr(byte)
            if (ch.isascii() and ch.isalnum()) or ch == "_" or (ch == "." and not (i == 0 and j == 0)):
                out.append(ch)
            else:
                out.append(f"%{byte:02X}")
    return "".join(out)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tool(name: str, backend: str) -> str:
    """Absolute path of ``name`` on ``PATH``, else :class:`MissingTool` naming the package."""
    return find_tool(name, package=PACKAGES.get(name, name), backend=backend)


def tail(text: str | bytes | None, lines: int = 6) -> str:
    """The last lines of a tool's stderr, on one line, for an error message."""
    return stderr_tail(text, lines)


def write_json(path: Path, data: Mapping[str, Any], *, sync: bool = True) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), sync=sync)


#: An export record larger than this is refused (they are a few hundred bytes).
MAX_RECORD_BYTES = 1 << 20


def read_json(path: Path) -> dict[str, Any]:
    """A JSON record of an export: untrusted input (exports travel between machines).
    Read through one descriptor, never through a symlink, never from a FIFO or device,
    at most ``MAX_RECORD_BYTES``; ``ValueError`` for anything but a JSON object."""
    try:
        data = json.loads(read_regular(path, MAX_RECORD_BYTES))
    except SnapcoreError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def discarding_name(name: str) -> str:
    """What ``<slug>.export.json`` is renamed to while its export is deleted: the
    export no longer looks complete, and a delete that stopped halfway can still
    prove, when run again, that the files are this checkpoint's."""
    return f".{name}.export.json.discarding"


def proof_of(export_dir: Path, name: str, checkpoint_id: str, backend: str) -> dict[str, Any] | None:
    """The record by which ``export_dir`` holds ``backend``'s export of ``name`` for
    ``checkpoint_id`` (``export.json``, or its ``.discarding`` rename); None when
    there is none. Raises :class:`BackendError` when a record names another
    checkpoint or backend: what snapcore deletes, it proves it made."""
    for record in (export_dir / f"{name}.export.json", export_dir / discarding_name(name)):
        try:
            info = read_json(record)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            why = f"refusing to delete {export_dir}: {record} is unreadable ({exc})"
            raise BackendError(why, backend=backend) from None
        if info.get("checkpoint_id") != checkpoint_id or info.get("backend") != backend:
            raise BackendError(
                f"refusing to delete {export_dir}: {record.name} is {info.get('backend')!r}'s export of checkpoint "
                f"{info.get('checkpoint_id')!r}, not {backend!r}'s of {checkpoint_id!r}",
                backend=backend,
            )
        return info
    return None


def record_slug(details: Mapping[str, Any], mount_point: str) -> str:
    """The slug an export record names (or the mount's own): one plain file name."""
    return plain_name(details.get("slug") or slug(mount_point), what="an export's slug")


def check_dest_dir(dest: Path, target: Target, backend: str) -> None:
    """``dest`` exists, is a writable directory, and is not on the filesystem it copies."""
    where = target.mount.mount_point
    if not dest.is_absolute():
        raise BackendError(f"dest {dest} is not an absolute path", mount=where, backend=backend)
    try:
        st = dest.stat()
    except FileNotFoundError:
        raise BackendError(
            f"dest {dest} does not exist: create it (mkdir -p {dest}) or fix options.{backend}.dest",
            mount=where,
            backend=backend,
        ) from None
    except OSError as exc:
        raise BackendError(f"dest {dest}: {exc.strerror}", mount=where, backend=backend) from exc
    if not dest.is_dir():
        raise BackendError(f"dest {dest} is not a directory", mount=where, backend=backend)
    if st.st_dev == target.mount.dev:
        raise BackendError(
            f"dest {dest} is on the filesystem being exported: an export must go to another filesystem "
            "(with a live image it would also block on the frozen filesystem)",
            mount=where,
            backend=backend,
        )
    probe = dest / f".snapcore-probe-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        hint = " (a read-only filesystem)" if exc.errno == errno.EROFS else ""
        raise BackendError(f"dest {dest} is not writable{hint}: {exc.strerror}", mount=where, backend=backend) from exc


def full_hint(path: Path) -> str:
    """A hint when the filesystem holding ``path`` is (nearly) full, else ``""``.

    GNU tar reports a full disk as a short write ("Wrote only 8192 of 10240
    bytes"), without the errno: say it plainly.
    """
    try:
        st = os.statvfs(path)
    except OSError:
        return ""
    free = st.f_bfree * st.f_frsize  # root writes into the reserved blocks too
    log.debug("free space under %s after a failure: %d bytes (%d for non-root)", path, free, st.f_bavail * st.f_frsize)
    if free < (4 << 20) or st.f_bavail == 0:
        return f"the filesystem of {path} is full (No space left on device; {free >> 10} KiB free); "
    return ""


def refuse_dest_on_a_target(name: str, target: Target, dest: Path, targets: tuple[Target, ...]) -> None:
    """``before_freeze`` of an exporter: an export must not write to a filesystem
    this checkpoint freezes."""
    other = same_filesystem_as_target(dest, targets)
    if other is not None:
        raise BackendError(
            f"dest {dest} is on {other.mount.mount_point}, a target of this checkpoint: "
            "the export would write to a filesystem being frozen",
            mount=target.mount.mount_point,
            backend=name,
        )


def same_filesystem_as_target(dest: Path, targets: tuple[Target, ...]) -> Target | None:
    """The target of this checkpoint whose filesystem holds ``dest``, if any."""
    try:
        dev = dest.stat().st_dev
    except OSError:
        return None
    for other in targets:
        if other.mount.dev == dev:
            return other
    return None


def remove_tree(path: Path) -> None:
    """Delete ``path`` (a file or a tree), never following symlinks; missing is fine."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def prepare_restore_dir(dest: Path, backend: str) -> bool:
    """Make sure ``dest`` is an empty directory; True when we created it."""
    if dest.is_symlink():
        raise BackendError(f"{dest} is a symlink: restore into a real, empty directory", backend=backend)
    if dest.exists():
        if not dest.is_dir():
            raise BackendError(f"{dest} is not a directory", backend=backend)
        if any(dest.iterdir()):
            raise BackendError(f"{dest} is not empty: restore into an empty directory", backend=backend)
        return False
    try:
        dest.mkdir(parents=True, mode=0o700)
    except OSError as exc:
        raise BackendError(f"cannot create {dest}: {exc.strerror}", backend=backend) from exc
    return True


def empty_restore_dir(dest: Path, created: bool) -> None:
    """Undo a failed restore: the directory was empty (or absent) before."""
    with contextlib.suppress(OSError):
        for child in dest.iterdir():
            remove_tree(child)
    if created:
        remove_if_empty(dest)


def copy_manifest(export_dir: Path, manifest_text: str) -> None:
    write_atomic(export_dir / MANIFEST_NAME, manifest_text.encode())


def manifest_problem(export_dir: Path, checkpoint_id: str) -> str | None:
    """Why the manifest copy in ``export_dir`` cannot be trusted, or None."""
    path = export_dir / MANIFEST_NAME
    try:
        data = read_json(path)
    except FileNotFoundError:
        return f"{path} is missing: the checkpoint never finished, this export is incomplete"
    except (OSError, ValueError) as exc:
        return f"{path} is unreadable: {exc}"
    if data.get("id") != checkpoint_id:
        return f"{path} belongs to checkpoint {data.get('id')!r}, not {checkpoint_id!r}"
    if data.get("outcome") != "ok":
        return f"{path} says the checkpoint {data.get('outcome')!r}"
    return None


def latest_pointer(dest: Path, name: str) -> Path:
    return dest / f"{name}.latest"


def read_latest(dest: Path, name: str) -> str | None:
    try:
        value = latest_pointer(dest, name).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return value or None


def publish_exports(
    name: str,
    checkpoint: Checkpoint,
    outcome: Outcome,
    manifest: Manifest,
    publish: Callable[[Target, Export, str], None],
) -> None:
    """``checkpoint_end`` of an exporter: once the manifest is written, put its copy
    beside each of this exporter's exports (the mark of a complete export)."""
    if outcome is not Outcome.OK:
        return
    text = manifest.dumps()
    for record in manifest.targets:
        if record.exporter != name or record.outcome != Outcome.OK.value or not record.export_record:
            continue
        target = next((t for t in checkpoint.targets if t.mount.mount_point == record.mount), None)
        if target is None:
            continue
        try:
            publish(target, Export.from_json(record.export_record), text)
        except Exception as exc:
            # never raise: pluggy would skip the other plugins' checkpoint_end
            log.error("%s: the export stays incomplete (no manifest beside it): %s", record.mount, exc)


def names_in(directory: Path) -> set[str]:
    """The names in ``directory`` (none when it is missing or unreadable)."""
    try:
        return {p.name for p in directory.iterdir()}
    except OSError:
        return set()
