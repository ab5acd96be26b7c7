"""The ``rsync`` exporter: a complete tree per checkpoint, unchanged files hard-linked
to the previous export (``--link-dest``), locally or on an rsync daemon / over ssh.

Layout as in :mod:`snapcore_tar.common`, with ``<slug>/`` the tree and
``<slug>.files`` the list of what rsync put in it (``TYPE SIZE NAME``, names as
rsync escapes them), against which ``verify`` checks the tree. A local tree is
written as ``.<slug>.part`` and renamed; a remote tree cannot be renamed, so there
the sidecars (``export.json``, then ``manifest.json``) uploaded after it are what
make it complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore import BackendError, Export, Image, SnapcoreError, Target, plain_name, read_regular, syncfs, write_atomic
from snapcore_tar import RSYNC, common
from snapcore_tar.common import (
    EXPORT_FORMAT,
    MANIFEST_NAME,
    manifest_problem,
    read_json,
    slug,
    tool,
    write_json,
)
from snapcore_tar.progress import Progress, bar_wanted
from snapcore_tar.runner import run
from snapcore_tar.tar_backend import empty_restore_dir, prepare_restore_dir

log = logging.getLogger(__name__)

NAME = RSYNC
#: What every tree keeps: -a plus hard links, ACLs, xattrs, sparse files, numeric ids.
#: --modify-window=-1 compares times to the nanosecond: with the default, rsync leaves
#: a symlink made in the current second with the time of its own creation.
COPY_FLAGS = ("-aHAXS", "--numeric-ids", "--modify-window=-1")
#: rsync exit statuses that still mean a complete tree: 24 = files vanished while copied
OK_CODES = (0, 24)
_REMOTE_SSH = re.compile(r"^(?:[^@/:\s]+@)?[^/:\s]+:(?!:)")
_ITEM = re.compile(r"^\+ (?P<item>.{11}) (?P<size>\d+) (?P<name>.*)$")  # unchanged items are padded with spaces
_LIST = re.compile(r"^(?P<mode>\S{10}) +(?P<size>[\d,]+) \S+ \S+ (?P<name>.*)$")
_TYPE_OF_MODE = {"-": "f", "d": "d", "l": "L", "c": "D", "b": "D", "p": "S", "s": "S"}


@dataclass(frozen=True, slots=True)
class Dest:
    """Where trees go: a local directory, an rsync daemon module, or an ssh path."""

    raw: str
    kind: str  # "local" | "daemon" | "ssh"

    @classmethod
    def parse(cls, value: str) -> Dest:
        value = value.strip()
        if value.startswith("/"):
            return cls(os.path.normpath(value), "local")
        if value.startswith("rsync://") or "::" in value.split("/", 1)[0]:
            return cls(value.rstrip("/"), "daemon")
        if _REMOTE_SSH.match(value):
            return cls(value.rstrip("/"), "ssh")
        raise ValueError(
            f"dest {value!r} is neither an absolute path, rsync://HOST[:PORT]/MODULE[/PATH], "
            "HOST::MODULE[/PATH] nor [USER@]HOST:PATH"
        )

    @property
    def local(self) -> bool:
        return self.kind == "local"

    def join(self, *parts: str) -> str:
        return "/".join([self.raw.rstrip("/") or "/", *parts]) if parts else self.raw

    def path(self, *parts: str) -> Path:
        assert self.local
        return Path(self.raw, *parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class RsyncOptions:
    dest: Dest
    rsh: str | None
    password_file: str | None
    timeout: float

    @classmethod
    def of(cls, target: Target) -> RsyncOptions:
        opts = target.options_for(NAME)
        return cls.from_mapping(opts, target)

    @classmethod
    def from_mapping(cls, opts: Mapping[str, Any], target: Target | None = None) -> RsyncOptions:
        raw = opts.get("dest")
        where = target.mount.mount_point if target else None
        if not raw:
            raise BackendError("no dest: set options.rsync.dest", mount=where, backend=NAME)
        try:
            dest = Dest.parse(str(raw))
        except ValueError as exc:
            raise BackendError(str(exc), mount=where, backend=NAME) from None
        return cls(
            dest=dest,
            rsh=opts.get("rsh") or None,
            password_file=opts.get("password_file") or None,
            timeout=float(opts.get("timeout") or 30.0),
        )

    def connection(self) -> list[str]:
        """Options that say how to reach the destination."""
        args = [f"--timeout={max(1, int(self.timeout))}"]
        if self.dest.kind == "daemon":
            args.append(f"--contimeout={max(1, int(self.timeout))}")
            if self.password_file:
                args.append(f"--password-file={self.password_file}")
        elif self.dest.kind == "ssh" and self.rsh:
            args += ["-e", self.rsh]
        return args


def _fail(message: str, target: Target | None) -> BackendError:
    return BackendError(message, mount=target.mount.mount_point if target else None, backend=NAME)


def _rsync(
    opts: RsyncOptions,
    args: Sequence[str],
    *,
    target: Target | None,
    what: str,
    on_out: Any = None,
    ok_codes: Sequence[int] = (0,),
    hint: Callable[[], str] | None = None,
) -> int:
    argv = [tool("rsync", NAME), *opts.connection(), *args]
    return run(argv, target=target, backend=NAME, what=what, on_out=on_out, ok_codes=ok_codes, hint=hint).exit_code


# -- prepare ----------------------------------------------------------------------------


def prepare(target: Target) -> None:
    opts = RsyncOptions.of(target)
    tool("rsync", NAME)
    if opts.dest.local:
        common.check_dest_dir(opts.dest.path(), target, NAME)
        return
    # reach the daemon or host now, before anything is frozen
    _rsync(opts, ["--list-only", "--dirs", opts.dest.join("")], target=target, what=f"reaching {opts.dest.raw}")


def local_dest(target: Target) -> Path | None:
    opts = RsyncOptions.of(target)
    return opts.dest.path() if opts.dest.local else None


# -- sidecars ---------------------------------------------------------------------------


@contextlib.contextmanager
def sidecars(
    opts: RsyncOptions, checkpoint_id: str, name: str, scratch: Path | None, *, files: bool = False
) -> Iterator[Path]:
    """The directory holding ``checkpoint_id``'s sidecar files: the export directory
    itself when local, else a scratch copy fetched from the remote side."""
    if opts.dest.local:
        yield opts.dest.path(checkpoint_id)
        return
    with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as tmp:
        includes = [f"--include=/{name}.export.json", f"--include=/{MANIFEST_NAME}"]
        if files:
            includes.append(f"--include=/{name}.files")
        with contextlib.suppress(BackendError):
            _rsync(
                opts,
                ["-r", *includes, "--exclude=*", opts.dest.join(checkpoint_id) + "/", tmp + "/"],
                target=None,
                what="fetching the export's sidecar files",
                ok_codes=(0, 23),
            )
        yield Path(tmp)


def read_latest(opts: RsyncOptions, name: str, scratch: Path | None) -> str | None:
    if opts.dest.local:
        return common.read_latest(opts.dest.path(), name)
    with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as tmp:
        code = _rsync(
            opts,
            [opts.dest.join(f"{name}.latest"), tmp + "/"],
            target=None,
            what="reading the latest export pointer",
            ok_codes=(0, 23),
        )
        if code != 0:
            return None
        return common.read_latest(Path(tmp), name)


def _previous(opts: RsyncOptions, target: Target, name: str, scratch: Path | None) -> str | None:
    """The newest complete rsync export of this mount in dest, to hard-link against."""
    prev = read_latest(opts, name, scratch)
    if prev is None or prev == target.checkpoint_id:
        return None
    with sidecars(opts, prev, name, scratch) as where:
        problem = manifest_problem(where, prev)
        if problem is None:
            try:
                info = read_json(where / f"{name}.export.json")
                if info.get("backend") != NAME:
                    problem = f"it is a {info.get('backend')!r} export"
            except (OSError, ValueError) as exc:
                problem = f"its export.json is unreadable: {exc}"
    if problem is not None:
        log.warning(
            "%s: copying everything: the previous export %s cannot be linked to: %s",
            target.mount.mount_point,
            prev,
            problem,
        )
        return None
    return prev


# -- export -----------------------------------------------------------------------------


class _ItemCounter:
    """Reads rsync's ``--out-format`` lines: the file list, and progress."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.entries: list[str] = []
        self.bytes = 0
        self._pending = ""

    def __call__(self, chunk: str) -> None:
        data = self._pending + chunk
        lines = data.split("\n")
        self._pending = lines.pop()
        nbytes = 0
        files = 0
        for line in lines:
            m = _ITEM.match(line)
            if m is None:
                continue
            item = m["item"]
            if item.startswith("*"):
                continue  # "*deleting": nothing is deleted from a fresh tree
            size = int(m["size"])
            kind = item[1]
            self.entries.append(f"{kind} {size if kind == 'f' else 0} {m['name']}")
            if kind == "f":
                nbytes += size
            files += 1
        self.bytes += nbytes
        self.progress.add(nbytes=nbytes, files=files)


def export(target: Target, image: Image) -> Export:
    opts = RsyncOptions.of(target)
    if not image.path:
        raise _fail(f"the {image.backend} image has no path to copy", target)
    name = slug(target.mount.mount_point)
    me = target.checkpoint_id
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    prev = _previous(opts, target, name, scratch)
    dest = opts.dest
    tree = dest.join(me, name)
    write_to = dest.join(me, f".{name}.part") if dest.local else tree
    made_dir = False
    if dest.local:
        export_dir = dest.path(me)
        made_dir = not export_dir.exists()
        try:
            export_dir.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise _fail(f"cannot create {export_dir}: {exc.strerror}", target) from exc
        if (export_dir / name).exists() or (export_dir / f"{name}.export.json").exists():
            raise _fail(f"{export_dir / name} already exists: checkpoint ids must be unique per dest", target)
    # the file list: a remote tree is listed by rsync as it copies; a local one is
    # walked after the thaw (finish), which keeps the copy itself as fast as rsync alone
    listed = not dest.local or bar_wanted(sys.stderr)
    args = [*COPY_FLAGS, "--one-file-system", "--mkpath"]
    if listed:
        args += ["--info=name2", "--out-format=+ %i %l %n"]
    if prev is not None:
        # relative to the tree being written: DEST/ID/<slug> → DEST/PREV/<slug>
        args.append(f"--link-dest=../../{prev}/{name}")
    args += [image.path.rstrip("/") + "/", write_to + "/"]
    total_bytes = total_files = None
    with contextlib.suppress(OSError):
        st = os.statvfs(image.path)
        total_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
        total_files = st.f_files - st.f_ffree
    progress = Progress(f"rsync {target.mount.mount_point} → {tree}", total_bytes=total_bytes, total_files=total_files)
    counter = _ItemCounter(progress)
    ok = False
    try:
        code = _rsync(
            opts,
            args,
            target=target,
            what=f"rsync to {dest.raw}",
            on_out=counter if listed else None,
            ok_codes=OK_CODES,
            hint=(lambda: common.full_hint(dest.path(me))) if dest.local else None,
        )
        warnings = []
        if code == 24:
            warnings.append("rsync: some files vanished while they were copied")
            log.warning("%s: %s", target.mount.mount_point, warnings[-1])
        details: dict[str, Any] = {
            "dest": dest.raw,
            "slug": name,
            "tree": name,
            "files": None if dest.local else len(counter.entries),
            "bytes": None if dest.local else counter.bytes,
            "link_dest": prev,
            "file_list": f"{name}.files",
            "warnings": warnings,
        }
        info = {
            "format": EXPORT_FORMAT,
            "backend": NAME,
            "checkpoint_id": me,
            "mount": target.mount.mount_point,
            "created": common.utc_now(),
            **details,
        }
        listing = ("\n".join(counter.entries) + "\n").encode("latin-1")
        if dest.local:
            export_dir = dest.path(me)
            os.rename(export_dir / f".{name}.part", export_dir / name)
            write_json(export_dir / f"{name}.export.json", info, sync=False)
        else:
            with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as tmp:
                Path(tmp, f"{name}.files").write_bytes(listing)
                write_json(Path(tmp, f"{name}.export.json"), info)
                # the list first, export.json last: it is what makes the tree complete
                _rsync(
                    opts,
                    [str(Path(tmp, f"{name}.files")), dest.join(me) + "/"],
                    target=target,
                    what="uploading the file list",
                )
                _rsync(
                    opts,
                    [str(Path(tmp, f"{name}.export.json")), dest.join(me) + "/"],
                    target=target,
                    what="uploading export.json",
                )
        ok = True
    except OSError as exc:
        raise _fail(f"finishing the tree {tree} failed: {exc.strerror or exc}", target) from exc
    finally:
        progress.close(ok)
        if not ok:
            with contextlib.suppress(Exception):
                _remove(opts, me, name, scratch)
            if made_dir:
                common.remove_if_empty(dest.path(me))
    return Export(backend=NAME, ref=tree, path=dest.join(me), details=details)


def _remove(opts: RsyncOptions, checkpoint_id: str, name: str, scratch: Path | None, *, proven: bool = True) -> None:
    """Delete this export's tree and sidecars (export.json first). Locally, only what
    its ``export.json`` proves is this checkpoint's rsync export (a manifest is
    untrusted input), else the ``.part`` tree alone, unless ``proven`` by our own
    journal or by the export that was just written."""
    if opts.dest.local:
        export_dir = opts.dest.path(checkpoint_id)
        proof = common.proof_of(export_dir, name, checkpoint_id, NAME)
        if proof is None and not proven and os.path.lexists(export_dir / name):
            raise BackendError(
                f"refusing to delete {export_dir / name}: no {name}.export.json there proves it is checkpoint "
                f"{checkpoint_id}'s rsync export",
                backend=NAME,
            )
        record = export_dir / f"{name}.export.json"
        marker = export_dir / common.discarding_name(name)
        if proof is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rename(record, marker)  # first: the export stops looking complete
        common.remove_tree(export_dir / f".{name}.part")
        if proof is not None or proven:
            with contextlib.suppress(FileNotFoundError):
                (export_dir / f"{name}.files").unlink()
            common.remove_tree(export_dir / name)
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()  # the proof last: a delete that stops halfway can go on
        return
    with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as empty:
        # an empty directory synced with --delete, limited to this export's names
        filters = [
            f"--include=/{name}.export.json",
            f"--include=/{name}.files",
            f"--include=/{name}/***",
            "--exclude=*",
        ]
        _rsync(
            opts,
            ["-r", "--delete", *filters, empty + "/", opts.dest.join(checkpoint_id) + "/"],
            target=None,
            what=f"deleting {opts.dest.join(checkpoint_id, name)}",
            ok_codes=(0, 23),
        )


# -- after the checkpoint ---------------------------------------------------------------


def finish(target: Target, export: Export) -> None:
    """After the thaw, before the manifest says ok: record the file list, sync the tree."""
    opts = RsyncOptions.from_mapping({**target.options_for(NAME), "dest": export.details.get("dest")}, target)
    name = common.record_slug(export.details, target.mount.mount_point)
    if opts.dest.local:
        export_dir = opts.dest.path(target.checkpoint_id)
        entries, nbytes = walk_tree(export_dir / name)
        write_atomic(export_dir / f"{name}.files", ("\n".join(entries) + "\n").encode("latin-1"), sync=False)
        info_path = export_dir / f"{name}.export.json"
        info = read_json(info_path)
        info.update(files=len(entries), bytes=nbytes)
        write_json(info_path, info, sync=False)
        syncfs(export_dir)  # the tree and its sidecars, before the manifest says "complete"


def publish(target: Target, export: Export, manifest_text: str) -> None:
    """Once the manifest is written: its copy beside the tree, then ``latest``."""
    opts = RsyncOptions.from_mapping({**target.options_for(NAME), "dest": export.details.get("dest")}, target)
    name = common.record_slug(export.details, target.mount.mount_point)
    me = target.checkpoint_id
    if opts.dest.local:
        export_dir = opts.dest.path(me)
        common.copy_manifest(export_dir, manifest_text)
        write_atomic(common.latest_pointer(opts.dest.path(), name), f"{me}\n".encode())
        return
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as tmp:
        Path(tmp, MANIFEST_NAME).write_text(manifest_text, encoding="utf-8")
        Path(tmp, f"{name}.latest").write_text(f"{me}\n", encoding="utf-8")
        _rsync(
            opts,
            [str(Path(tmp, MANIFEST_NAME)), opts.dest.join(me) + "/"],
            target=target,
            what="uploading the manifest",
        )
        # --ignore-times: "s0\n" and "s1\n" have one size, and written within one
        # second one mtime: rsync's quick check would keep the old pointer
        _rsync(
            opts,
            ["--ignore-times", str(Path(tmp, f"{name}.latest")), opts.dest.join("")],
            target=target,
            what="moving the latest pointer",
        )


def discard(target: Target, export: Export, *, unfinished: bool = False) -> None:
    """Delete this export (what its record proves is this checkpoint's; see
    :func:`_remove`); ``unfinished``: our journal says it never returned."""
    opts = RsyncOptions.from_mapping({**target.options_for(NAME), "dest": export.details.get("dest")}, target)
    name = common.record_slug(export.details, target.mount.mount_point)
    me = Path(str(export.path)).name if export.path else target.checkpoint_id
    if me != target.checkpoint_id:  # what snapcore deletes, it proves it made
        raise _fail(f"refusing to delete the export {me}: it is not checkpoint {target.checkpoint_id}'s", target)
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    _remove(opts, me, name, scratch, proven=unfinished)
    if opts.dest.local:
        if common.read_latest(opts.dest.path(), name) == me:
            with contextlib.suppress(FileNotFoundError):
                common.latest_pointer(opts.dest.path(), name).unlink()
        export_dir = opts.dest.path(me)
        with contextlib.suppress(OSError):
            left = [p.name for p in export_dir.iterdir()]
            if all(n == MANIFEST_NAME or n.startswith(".") for n in left):
                with contextlib.suppress(FileNotFoundError):
                    (export_dir / MANIFEST_NAME).unlink()
                common.remove_if_empty(export_dir)


def discard_partial(target: Target) -> list[str]:
    """Remove what an export of ``target`` that never returned (its controller was
    killed) left: the ``.part`` tree, or a remote tree without its ``export.json``."""
    opts = RsyncOptions.of(target)
    name = slug(target.mount.mount_point)
    me = target.checkpoint_id
    before = common.names_in(opts.dest.path(me)) if opts.dest.local else {"(remote)"}
    if not before:
        return []
    discard(
        target,
        Export(
            backend=NAME,
            ref=opts.dest.join(me, name),
            path=opts.dest.join(me),
            details={"slug": name, "dest": opts.dest.raw},
        ),
        unfinished=True,
    )
    if not opts.dest.local:
        return [f"removed the unfinished export {opts.dest.join(me, name)}"]
    gone = before - common.names_in(opts.dest.path(me))
    return [f"removed the unfinished export file {opts.dest.path(me, n)}" for n in sorted(gone)]


# -- verify and restore -----------------------------------------------------------------


def escape(raw: bytes) -> str:
    r"""A name as rsync prints it: ``\#ooo`` for non-printable bytes (C locale)."""
    out: list[str] = []
    for i, byte in enumerate(raw):
        if byte < 0x20 or byte >= 0x7F or (byte == 0x5C and raw[i + 1 : i + 2] == b"#"):
            out.append(f"\\#{byte:03o}")
        else:
            out.append(chr(byte))
    return "".join(out)


def walk_tree(tree: Path) -> tuple[list[str], int]:
    """The file list of a local tree (``TYPE SIZE NAME``, as rsync's ``%i %l %n``) and its bytes."""
    entries = ["d 0 ./"]
    nbytes = 0
    root = os.fsencode(tree)
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for entry in it:
                path = os.path.join(rel, entry.name) if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                kind = _kind_of(st.st_mode)
                if kind == "d":
                    entries.append(f"d 0 {escape(path)}/")
                    stack.append(path)
                elif kind == "f":
                    entries.append(f"f {st.st_size} {escape(path)}")
                    nbytes += st.st_size
                else:
                    entries.append(f"{kind} 0 {escape(path)}")
    return entries, nbytes


def unescape(name: str) -> bytes:
    r"""rsync's ``\#ooo`` escapes (non-printable bytes in its output) → raw bytes."""
    raw = name.encode("latin-1")
    if b"\\#" not in raw:
        return raw
    return re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), raw)


def parse_file_list(text: str) -> list[tuple[str, int, str]]:
    entries = []
    for line in text.splitlines():
        if not line:
            continue
        kind, size, name = line.split(" ", 2)
        entries.append((kind, int(size), name))
    return entries


def _where(export: Export, target: Target) -> tuple[RsyncOptions, str, str]:
    """Options (dest = the export's directory's parent), checkpoint id, slug."""
    name = common.record_slug(export.details, target.mount.mount_point)
    path = str(export.path or "")
    parent, _, me = path.rstrip("/").rpartition("/")
    opts = RsyncOptions.from_mapping({**target.options_for(NAME), "dest": parent or "/"}, target)
    return opts, me, name


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "L"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "D"
    return "S"


def _compare(entries: list[tuple[str, int, str]], found: Mapping[bytes, tuple[str, int]]) -> list[str]:
    problems: list[str] = []
    for kind, size, name in entries:
        key = unescape(name).rstrip(b"/") or b"."
        got = found.get(key)
        shown = name.rstrip("/") or "."
        if got is None:
            problems.append(f"{shown}: missing from the tree")
        elif got[0] != kind:
            problems.append(f"{shown}: is a {got[0]!r}, recorded as {kind!r}")
        elif kind == "f" and got[1] != size:
            problems.append(f"{shown}: {got[1]} bytes, recorded {size}")
    if len(problems) > 20:
        problems = [*problems[:20], f"... and {len(problems) - 20} more"]
    return problems


def _scan_local(tree: Path, entries: list[tuple[str, int, str]]) -> dict[bytes, tuple[str, int]]:
    found: dict[bytes, tuple[str, int]] = {}
    root = os.fsencode(tree)
    for _, _, name in entries:
        key = unescape(name).rstrip(b"/") or b"."
        try:
            st = os.lstat(os.path.join(root, key))
        except OSError:
            continue
        found[key] = (_kind_of(st.st_mode), st.st_size)
    return found


def _scan_remote(opts: RsyncOptions, url: str) -> dict[bytes, tuple[str, int]]:
    lines: list[str] = []

    def collect(chunk: str) -> None:
        lines.append(chunk)

    _rsync(opts, ["--list-only", "-r", "--no-h", url + "/"], target=None, what=f"listing {url}", on_out=collect)
    found: dict[bytes, tuple[str, int]] = {}
    for line in "".join(lines).splitlines():
        m = _LIST.match(line)
        if m is None:
            continue
        kind = _TYPE_OF_MODE.get(m["mode"][0], "S")
        name = m["name"]
        size = int(m["size"].replace(",", ""))
        if kind == "L" and " -> " in name:
            # "name -> target" (an rsync daemon shows targets; over ssh rsync shows the
            # name alone): every split is a candidate; the file list decides
            parts = name.split(" -> ")
            for i in range(1, len(parts)):
                found[unescape(" -> ".join(parts[:i]))] = (kind, size)
            continue
        found[unescape(name).rstrip(b"/") or b"."] = (kind, size)
    return found


#: A file list larger than this is refused (~60 bytes a file: a million files).
MAX_FILE_LIST_BYTES = 256 << 20


def verify(target: Target, export: Export) -> list[str]:
    opts, me, name = _where(export, target)
    scratch = None
    with sidecars(opts, me, name, scratch, files=True) as where:
        problems: list[str] = []
        problem = manifest_problem(where, me)
        if problem:
            problems.append(problem)
        try:
            info = read_json(where / f"{name}.export.json")
            listed = plain_name(info.get("file_list") or f"{name}.files", what="the file list")
            entries = parse_file_list(read_regular(where / listed, MAX_FILE_LIST_BYTES).decode("latin-1"))
        except (OSError, ValueError, SnapcoreError) as exc:
            return [*problems, f"{opts.dest.join(me)}: export.json or the file list is missing or unreadable: {exc}"]
        if opts.dest.local:
            tree = opts.dest.path(me, name)
            try:
                mode = os.lstat(tree).st_mode
            except OSError:
                return [*problems, f"{tree}: the tree is missing"]
            if not stat.S_ISDIR(mode):  # a symlink to elsewhere: restore would copy that
                return [*problems, f"{tree}: is not a directory (a symlink?), not the tree rsync wrote"]
            found = _scan_local(tree, entries)
        else:
            try:
                found = _scan_remote(opts, opts.dest.join(me, name))
            except BackendError as exc:
                return [*problems, str(exc)]
        problems += _compare(entries, found)
        if isinstance(info.get("files"), int) and info["files"] != len(entries):
            problems.append(f"the file list has {len(entries)} entries, export.json says {info['files']}")
    return problems


def restore(target: Target, export: Export, dest: Path) -> str:
    opts, me, name = _where(export, target)
    with sidecars(opts, me, name, None) as where:
        if not (where / f"{name}.export.json").is_file():
            raise _fail(
                f"no complete rsync export of {name} in {opts.dest.join(me)} ({name}.export.json missing)", target
            )
    # never restore what verify would call DAMAGED (a tree swapped for a symlink
    # copies whatever it points to)
    problems = verify(target, export)
    if problems:
        raise _fail(f"refusing to restore {opts.dest.join(me, name)}: {'; '.join(problems[:5])}", target)
    dest = Path(os.path.abspath(dest))
    created = prepare_restore_dir(dest)
    source = opts.dest.join(me, name) + "/"
    try:
        _rsync(opts, [*COPY_FLAGS, source, str(dest) + "/"], target=target, what=f"restoring {source}")
    except BaseException:
        empty_restore_dir(dest, created)
        raise
    return f"restored the tree {source} into {dest}"
