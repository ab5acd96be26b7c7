"""``btrfs send`` streams of snapcore's snapshots, full or incremental, and ``btrfs receive``.

In the destination directory, per checkpoint::

    <id>.btrfs[.zst]          the send stream (zstd-compressed when asked)
    <id>.btrfs-send.json      its record: mount, snapshot, parent, the chain of streams

An incremental stream (``-p``) is made against the newest earlier export of the
same mount whose snapshot still exists (with the same uuid) and whose own chain is
complete. Restoring replays the chain, oldest (full) stream first. Discarding an
export keeps its stream as long as a later export still needs it; the stream goes
with the last export that needs it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import btrfsutil

from snapcore import BackendError, Cancel, Cancelled, MissingTool, stderr_tail, tied_to_controller, write_atomic
from snapcore_btrfs import BTRFS_SEND, restore, subvol

NAME = BTRFS_SEND
RECORD_SUFFIX = ".btrfs-send.json"
CHUNK = 1 << 20


def fail(message: str, mount: str | None = None) -> BackendError:
    return BackendError(message, mount=mount, backend=NAME)


def need_tools(compress: str) -> None:
    if shutil.which("btrfs") is None:
        raise MissingTool("btrfs", "btrfs-progs", backend=NAME)
    if compress == "zstd" and shutil.which("zstd") is None:
        raise MissingTool("zstd", "zstd", backend=NAME)


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    checkpoint_id: str
    mount: str
    snapshot: str
    snapshot_uuid: str
    stream: str
    compress: str
    parent: str | None
    chain: tuple[str, ...]
    size: int
    sha256: str
    created: float
    discarded: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "snapcore": 1,
            "checkpoint_id": self.checkpoint_id,
            "mount": self.mount,
            "snapshot": self.snapshot,
            "snapshot_uuid": self.snapshot_uuid,
            "stream": self.stream,
            "compress": self.compress,
            "parent": self.parent,
            "chain": list(self.chain),
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
            "discarded": self.discarded,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        return cls(
            checkpoint_id=str(data["checkpoint_id"]),
            mount=str(data["mount"]),
            snapshot=str(data["snapshot"]),
            snapshot_uuid=str(data["snapshot_uuid"]),
            stream=str(data["stream"]),
            compress=str(data["compress"]),
            parent=data.get("parent"),
            chain=tuple(data["chain"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            created=float(data["created"]),
            discarded=bool(data.get("discarded", False)),
        )


def record_path(dest: Path, checkpoint_id: str) -> Path:
    return dest / f"{checkpoint_id}{RECORD_SUFFIX}"


def read_record(path: Path) -> Record | None:
    try:
        return Record.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2).encode())


def records(dest: Path) -> Iterator[Record]:
    if not dest.is_dir():
        return
    for path in dest.glob(f"*{RECORD_SUFFIX}"):
        record = read_record(path)
        if record is not None and path.name == f"{record.checkpoint_id}{RECORD_SUFFIX}":
            yield record


def _snapshot_alive(record: Record) -> bool:
    try:
        return bool(btrfsutil.subvolume_info(record.snapshot).uuid.hex() == record.snapshot_uuid)
    except btrfsutil.BtrfsUtilError:
        return False


def find_parent(dest: Path, mount: str, checkpoint_id: str) -> Record | None:
    """The newest earlier live export of ``mount`` usable as ``-p`` parent."""
    candidates = sorted(
        (r for r in records(dest) if r.mount == mount and r.checkpoint_id != checkpoint_id and not r.discarded),
        key=lambda r: r.created,
        reverse=True,
    )
    for record in candidates:
        if _snapshot_alive(record) and all((dest / s).is_file() for s in record.chain):
            return record
    return None


class _Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _pump(src: IO[bytes], sink: _Sink) -> tuple[int, str]:
    import hashlib  # only when exporting or verifying: keeps the CLI's start short

    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        sink.write(chunk)
    return size, digest.hexdigest()


def _tail(data: bytes) -> str:
    return stderr_tail(data) or "no message"


def export(
    *,
    checkpoint_id: str,
    mount: str,
    snapshot: Path,
    dest: Path,
    compress: str,
    incremental: bool,
    cancel: Cancel | None = None,
) -> tuple[Record, list[str]]:
    """Write the send stream of ``snapshot`` into ``dest``; returns its record and notes.

    ``btrfs send`` and zstd die with the controller, and at once when ``cancel`` is set."""
    need_tools(compress)
    notes: list[str] = []
    try:
        info = btrfsutil.subvolume_info(os.fspath(snapshot))
    except btrfsutil.BtrfsUtilError as exc:
        raise fail(f"{snapshot} is not a btrfs snapshot: {exc}", mount) from exc
    if not info.flags & subvol.RDONLY:
        raise fail(f"{snapshot} is not read-only: btrfs send needs a read-only snapshot", mount)
    dest.mkdir(parents=True, exist_ok=True)
    if record_path(dest, checkpoint_id).exists():
        raise fail(f"{record_path(dest, checkpoint_id)} already exists", mount)
    parent = find_parent(dest, mount, checkpoint_id) if incremental else None
    if incremental and parent is None and any(r.mount == mount for r in records(dest)):
        notes.append("no earlier export of this mount still has its snapshot: a full stream was sent")
    name = stream_name(checkpoint_id, compress)
    final = dest / name
    tmp = partial_path(dest, name)
    cmd = ["btrfs", "send", "-q"]
    if parent is not None:
        cmd += ["-p", parent.snapshot]
    cmd.append(os.fspath(snapshot))
    children: list[subprocess.Popen[bytes]] = []

    def stop() -> None:
        for child in children:
            with contextlib.suppress(OSError):
                child.kill()

    def started(child: subprocess.Popen[bytes]) -> None:
        children.append(child)
        if cancel is not None and cancel.is_set():  # cancelled before it existed
            stop()

    try:
        with open(tmp, "wb") as out, cancel.on_cancel(stop) if cancel else contextlib.nullcontext():
            with subprocess.Popen(tied_to_controller(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as sender:
                started(sender)
                assert sender.stdout is not None and sender.stderr is not None
                if compress == "zstd":
                    zstd_cmd = tied_to_controller(["zstd", "-q", "-T0", "-c"])
                    with subprocess.Popen(zstd_cmd, stdin=subprocess.PIPE, stdout=out) as zstd:
                        started(zstd)
                        assert zstd.stdin is not None
                        try:
                            size, digest = _pump(sender.stdout, zstd.stdin)
                        finally:
                            zstd.stdin.close()
                    zstd_status = zstd.returncode
                else:
                    size, digest = _pump(sender.stdout, out)
                    zstd_status = 0
                err = sender.stderr.read()
            if cancel is not None:
                cancel.check()
            if sender.returncode != 0:
                if parent is not None and not Path(parent.snapshot).exists():
                    raise fail(
                        f"the send parent {parent.snapshot} (checkpoint {parent.checkpoint_id}) was deleted "
                        f"while sending: run the checkpoint again for a full stream ({_tail(err)})",
                        mount,
                    )
                raise fail(f"{' '.join(cmd)} failed: {_tail(err)}", mount)
            if zstd_status != 0:
                raise fail(f"zstd failed with status {zstd_status}", mount)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if cancel is not None and cancel.is_set() and isinstance(exc, Exception):
            # a killed btrfs send or zstd (a broken pipe, a short stream) is the cancellation
            raise Cancelled(f"btrfs send of {mount} stopped: the checkpoint was cancelled ({cancel.reason})") from None
        raise
    record = Record(
        checkpoint_id=checkpoint_id,
        mount=mount,
        snapshot=os.fspath(snapshot),
        snapshot_uuid=info.uuid.hex(),
        stream=name,
        compress=compress,
        parent=parent.checkpoint_id if parent else None,
        chain=(*(parent.chain if parent else ()), name),
        size=size,
        sha256=digest,
        created=time.time(),
    )
    try:
        _write_json(record_path(dest, checkpoint_id), record.to_json())
    except OSError:
        with contextlib.suppress(OSError):
            final.unlink()
        raise
    return record, notes


#: The pre-copy's export of a checkpoint ``ID`` is a record of its own, ``ID.precopy``,
#: whose snapshot (``SNAPDIR/ID.precopy``) is sent before the freeze; the checkpoint's
#: own stream is then incremental against it and its chain holds both.
PRECOPY_SUFFIX = ".precopy"


def precopy_id(checkpoint_id: str) -> str:
    return f"{checkpoint_id}{PRECOPY_SUFFIX}"


def precopy(
    *,
    checkpoint_id: str,
    mount: str,
    snapshot_dir: Path,
    dest: Path,
    compress: str,
    incremental: bool,
    cancel: Cancel | None = None,
) -> list[dict[str, Any]]:
    """Before the freeze: a read-only snapshot of the live subvolume, sent (against the
    previous export's snapshot when there is one) as the record ``ID.precopy``; the
    checkpoint's export then sends only what changed since. One round."""
    started = time.perf_counter()
    snap = snapshot_dir / precopy_id(checkpoint_id)
    try:
        btrfsutil.create_snapshot(mount, os.fspath(snap), read_only=True)
    except btrfsutil.BtrfsUtilError as exc:
        raise fail(f"cannot snapshot {mount} for the pre-copy: {exc}", mount) from exc
    snapped = time.perf_counter()
    try:
        record, _ = export(
            checkpoint_id=precopy_id(checkpoint_id),
            mount=mount,
            snapshot=snap,
            dest=dest,
            compress=compress,
            incremental=incremental,
            cancel=cancel,
        )
    except BaseException:
        drop_precopy_snapshot(snapshot_dir, checkpoint_id)
        raise
    done = time.perf_counter()
    return [
        {
            "round": 1,
            "bytes": record.size,
            "stream": record.stream,
            "parent": record.parent,
            "snapshot_ms": round((snapped - started) * 1000, 3),
            "ms": round((done - started) * 1000, 3),
        }
    ]


def drop_precopy_snapshot(snapshot_dir: Path, checkpoint_id: str) -> bool:
    """Delete the pre-copy's snapshot (its stream stays in the chain); True if it was there."""
    snap = snapshot_dir / precopy_id(checkpoint_id)
    try:
        btrfsutil.set_subvolume_read_only(os.fspath(snap), False)  # a read-only one cannot go on older kernels
        btrfsutil.delete_subvolume(os.fspath(snap))
    except btrfsutil.BtrfsUtilError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise fail(f"cannot delete the pre-copy snapshot {snap}: {exc}") from exc
    return True


def stream_name(checkpoint_id: str, compress: str) -> str:
    return f"{checkpoint_id}.btrfs" + (".zst" if compress == "zstd" else "")


def partial_path(dest: Path, stream: str) -> Path:
    return dest / f".{stream}.partial"


def discard_partial(dest: Path, checkpoint_id: str) -> list[str]:
    """Remove what an export that never returned (its controller was killed) left in
    ``dest``: the ``.partial`` stream, or a stream renamed into place before its
    record was written."""
    if record_path(dest, checkpoint_id).exists():
        discard(dest, checkpoint_id)
        return [f"discarded the export {record_path(dest, checkpoint_id)}"]
    done = []
    if not checkpoint_id.endswith(PRECOPY_SUFFIX):  # and what its pre-copy wrote, if any
        done += discard_partial(dest, precopy_id(checkpoint_id))
    for compress in ("none", "zstd"):
        stream = stream_name(checkpoint_id, compress)
        for path in (partial_path(dest, stream), dest / stream):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            done.append(f"removed the unfinished stream {path}")
    return done


def load(dest: Path, checkpoint_id: str, mount: str | None = None) -> Record:
    record = read_record(record_path(dest, checkpoint_id))
    if record is None:
        raise fail(f"no export record {record_path(dest, checkpoint_id)}", mount)
    return record


def check_chain(dest: Path, record: Record) -> list[str]:
    problems = []
    for stream in record.chain:
        if not (dest / stream).is_file():
            own = stream == record.stream
            problems.append(
                f"the stream {dest / stream} is missing"
                + ("" if own else f": the incremental export {record.checkpoint_id} needs it as its parent")
            )
    return problems


@contextlib.contextmanager
def _open_stream(path: Path) -> Iterator[tuple[IO[bytes], Callable[[], int]]]:
    """The raw stream (decompressed on the fly) and a function giving zstd's status."""
    if path.suffix == ".zst":
        with subprocess.Popen(["zstd", "-q", "-d", "-c", os.fspath(path)], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            yield proc.stdout, proc.wait
    else:
        with open(path, "rb") as f:
            yield f, lambda: 0


def receive(dest: Path, record: Record, into: Path, mount: str | None = None) -> Path:
    """Replay ``record``'s chain into the directory ``into``; returns the received subvolume."""
    problems = check_chain(dest, record)
    if problems:
        raise fail("cannot restore: " + "; ".join(problems), mount)
    need_tools(record.compress)
    for stream in record.chain:
        with _open_stream(dest / stream) as (source, _):
            done = subprocess.run(["btrfs", "receive", os.fspath(into)], stdin=source, capture_output=True)
        if done.returncode != 0:
            raise fail(f"btrfs receive of {dest / stream} failed: {_tail(done.stderr)}", mount)
    received = into / Path(record.snapshot).name
    if not received.is_dir():
        raise fail(f"btrfs receive made no {received}", mount)
    return received


def restore_to(dest: Path, record: Record, target_dir: Path, mount: str | None = None) -> str:
    """Receive the chain next to ``target_dir``, then make a writable snapshot at it."""
    restore.check_restore_dest(target_dir, mount)
    problems = check_chain(dest, record)
    if problems:
        raise fail("cannot restore: " + "; ".join(problems), mount)
    parent = subvol.nearest_existing(target_dir if target_dir.exists() else target_dir.parent)
    if subvol.fsid(parent) is None:
        raise fail(f"{target_dir} is not on a btrfs filesystem: btrfs receive needs one", mount)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = target_dir.parent / f"{subvol.STAGING_PREFIX}receive-{record.checkpoint_id}-{os.urandom(3).hex()}"
    staging.mkdir()
    try:
        received = receive(dest, record, staging, mount)
        if target_dir.exists():
            target_dir.rmdir()
        btrfsutil.create_snapshot(os.fspath(received), os.fspath(target_dir), read_only=False)
    finally:
        for child in list(staging.iterdir()):
            with contextlib.suppress(BackendError):
                subvol.delete_subvolume_tree(child)
        with contextlib.suppress(OSError):
            staging.rmdir()
    return f"restored to {target_dir} from {len(record.chain)} send stream(s) in {dest}"


def verify(dest: Path, record: Record) -> list[str]:
    if record.discarded:
        return [f"the export {record.checkpoint_id} was discarded"]
    problems = check_chain(dest, record)
    path = dest / record.stream
    if not path.is_file():
        return problems
    with _open_stream(path) as (source, status):
        size, digest = _pump(source, _Null())
        source.close()
        unzipped = status()
    if unzipped != 0:
        problems.append(f"{path}: zstd cannot decompress it (status {unzipped})")
    elif (size, digest) != (record.size, record.sha256):
        problems.append(f"{path}: the stream is damaged (size or sha256 differs from the export's record)")
    return problems


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)


def discard(dest: Path, checkpoint_id: str) -> None:
    """Mark the export discarded; delete every stream no live export needs any more."""
    path = record_path(dest, checkpoint_id)
    record = read_record(path)
    if record is None:
        return
    if not record.discarded:
        _write_json(path, {**record.to_json(), "discarded": True})
    own = record_path(dest, precopy_id(checkpoint_id))  # the pre-copy goes with its checkpoint
    pre = read_record(own) if not checkpoint_id.endswith(PRECOPY_SUFFIX) else None
    if pre is not None and not pre.discarded:
        _write_json(own, {**pre.to_json(), "discarded": True})
    all_records = list(records(dest))
    needed = {s for r in all_records if not r.discarded for s in r.chain}
    for r in all_records:
        if r.discarded and r.stream not in needed:
            with contextlib.suppress(FileNotFoundError):
                (dest / r.stream).unlink()
            with contextlib.suppress(FileNotFoundError):
                record_path(dest, r.checkpoint_id).unlink()
