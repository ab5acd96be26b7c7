"""The ``rsync`` exporter: a complete tree per checkpoint, unchanged files hard-linked
to the previous export (``--link-dest``), locally or on an rsync daemon / over ssh
(:mod:`.rsync_dest`). This module writes and deletes exports; reading them back
is :mod:`.rsync_restore`.

Layout as in :mod:`snapcore_tar.common`, with ``<slug>/`` the tree and
``<slug>.files`` the list of what rsync put in it (:mod:`.rsync_files`), against
which ``verify`` checks the tree. A local tree is written as ``.<slug>.part`` and
renamed; a remote tree cannot be renamed, so there the sidecars (``export.json``,
then ``manifest.json``) uploaded after it are what make it complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from snapcore import BackendError, Export, Image, SnapcoreError, Target, plain_name, read_regular, syncfs, write_atomic
from snapcore_tar import common
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
from snapcore_tar.rsync_dest import COPY_FLAGS, NAME, RsyncOptions, fail, read_latest, rsync, sidecars
from snapcore_tar.rsync_files import ItemCounter, walk_tree

log = logging.getLogger(__name__)

#: rsync exit statuses that still mean a complete tree: 24 = files vanished while copied
OK_CODES = (0, 24)


# -- prepare ----------------------------------------------------------------------------


def prepare(target: Target) -> None:
    opts = RsyncOptions.of(target)
    tool("rsync", NAME)
    if opts.dest.local:
        common.check_dest_dir(opts.dest.path(), target, NAME)
        return
    # reach the daemon or host now, before anything is frozen
    rsync(opts, ["--list-only", "--dirs", opts.dest.join("")], target=target, what=f"reaching {opts.dest.raw}")
    # and find the export to link against now: each look costs a connection, which
    # inside the freeze window would be paid with the filesystem frozen
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    _previous(opts, target, slug(target.mount.mount_point), scratch)


# -- pre-copy ---------------------------------------------------------------------------

_STAT_LINES = {
    "Total file size": "total_bytes",
    "Total transferred file size": "bytes",
    "Number of regular files transferred": "files",
}


def _stats(text: str) -> dict[str, int]:
    """The figures of rsync's ``--stats`` we record (thousands separators allowed)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        label, sep, rest = line.partition(":")
        key = _STAT_LINES.get(label.strip())
        if sep and key:
            digits = rest.strip().split(" ", 1)[0].replace(",", "")
            if digits.isdigit():
                found[key] = int(digits)
    return found


def until_bytes(until: str, total: int) -> int:
    """``precopy_until`` as bytes: ``N%`` of the tree's size, or a size (``64M``)."""
    from snapcore import parse_size

    text = str(until).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            raise BackendError(f"precopy_until: {until!r} is neither N% nor a size", backend=NAME) from None
        return int(total * share / 100)
    try:
        return parse_size(text)
    except ValueError as exc:
        raise BackendError(f"precopy_until: {exc}", backend=NAME) from None


def precopy(target: Target) -> list[dict[str, Any]]:
    """Rounds of rsync of the live mount into the tree the export will complete
    (``.<slug>.part`` locally), before anything is frozen, until a round moves no more
    than ``precopy_until`` or ``precopy`` rounds were made; the export's final pass
    then moves only what changed since. One record per round."""
    import time

    options = target.options_for(NAME)
    most = int(options.get("precopy") or 0)
    if most <= 0:
        return []
    opts = RsyncOptions.of(target)
    name, me = slug(target.mount.mount_point), target.checkpoint_id
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    prev = _previous(opts, target, name, scratch)
    write_to, made_dir = _open_tree(opts, target, name)
    target.state_of(NAME).update(precopied=True, made_dir=made_dir)
    source = target.mount.mount_point.rstrip("/") + "/"
    args = [*COPY_FLAGS, "--one-file-system", "--mkpath", "--delete", "--stats"]
    if prev is not None:
        args.append(f"--link-dest=../../{prev}/{name}")
    rounds: list[dict[str, Any]] = []
    for number in range(1, most + 1):
        out: list[str] = []
        t = time.perf_counter()
        rsync(
            opts,
            [*args, source, write_to + "/"],
            target=target,
            what=f"pre-copy round {number} to {opts.dest.raw}",
            on_out=out.append,
            ok_codes=OK_CODES,
            hint=(lambda: common.full_hint(opts.dest.path(me))) if opts.dest.local else None,
        )
        stats = _stats("".join(out))
        moved = stats.get("bytes", 0)
        rounds.append({"round": number, **stats, "ms": round((time.perf_counter() - t) * 1000, 3)})
        if number > 1 and moved <= until_bytes(options.get("precopy_until") or "1%", stats.get("total_bytes", 0)):
            break  # the first round moves everything: it says nothing about the rate of change
    return rounds


def _open_tree(opts: RsyncOptions, target: Target, name: str) -> tuple[str, bool]:
    """Where this checkpoint's tree is written (``.<slug>.part`` locally, renamed when
    complete; the tree itself remotely), its directory made; and whether it was made."""
    me = target.checkpoint_id
    if not opts.dest.local:
        return opts.dest.join(me, name), False
    export_dir = opts.dest.path(me)
    made_dir = not export_dir.exists()
    try:
        export_dir.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot create {export_dir}: {exc.strerror}", target) from exc
    if (export_dir / name).exists() or (export_dir / f"{name}.export.json").exists():
        raise fail(f"{export_dir / name} already exists: checkpoint ids must be unique per dest", target)
    with contextlib.suppress(OSError):
        if os.stat(export_dir).st_dev == os.stat(target.mount.mount_point).st_dev:
            raise fail(f"{export_dir} is on the filesystem it would copy", target)
    return opts.dest.join(me, f".{name}.part"), made_dir


# -- export -----------------------------------------------------------------------------


def _previous(opts: RsyncOptions, target: Target, name: str, scratch: Path | None) -> str | None:
    """The newest complete rsync export of this mount in dest, to hard-link against
    (looked up once per checkpoint: the mount's lock keeps it from changing)."""
    state = target.state_of(NAME)
    if "previous" not in state:
        state["previous"] = _look_up_previous(opts, target, name, scratch)
    found: str | None = state["previous"]
    return found


def _look_up_previous(opts: RsyncOptions, target: Target, name: str, scratch: Path | None) -> str | None:
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


def export(target: Target, image: Image) -> Export:
    opts = RsyncOptions.of(target)
    if not image.path:
        raise fail(f"the {image.backend} image has no path to copy", target)
    name = slug(target.mount.mount_point)
    me = target.checkpoint_id
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    prev = _previous(opts, target, name, scratch)
    dest = opts.dest
    tree = dest.join(me, name)
    state = target.state_of(NAME)
    precopied = bool(state.get("precopied"))
    if precopied:  # the tree is there, filled before the freeze: complete it
        write_to = dest.join(me, f".{name}.part") if dest.local else tree
        made_dir = bool(state.get("made_dir"))
    else:
        write_to, made_dir = _open_tree(opts, target, name)
    # the file list: a remote tree is listed by rsync as it copies; a local one is
    # walked after the thaw (finish), which keeps the copy itself as fast as rsync alone
    listed = not dest.local or bar_wanted(sys.stderr)
    args = [*COPY_FLAGS, "--one-file-system", "--mkpath"]
    if listed:
        args += ["--info=name2", "--out-format=+ %i %l %n"]
    if prev is not None:
        # relative to the tree being written: DEST/ID/<slug> → DEST/PREV/<slug>
        args.append(f"--link-dest=../../{prev}/{name}")
    if precopied:  # what went since the pre-copy goes from the tree too
        args += ["--delete", "--stats"]
    args += [image.path.rstrip("/") + "/", write_to + "/"]
    total_bytes = total_files = None
    with contextlib.suppress(OSError):
        st = os.statvfs(image.path)
        total_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
        total_files = st.f_files - st.f_ffree
    progress = Progress(f"rsync {target.mount.mount_point} → {tree}", total_bytes=total_bytes, total_files=total_files)
    counter = ItemCounter(progress)
    said: list[str] = []

    def on_out(chunk: str) -> None:
        said.append(chunk)
        if listed:
            counter(chunk)

    ok = False
    try:
        code = rsync(
            opts,
            args,
            target=target,
            what=f"rsync to {dest.raw}",
            on_out=on_out if listed or precopied else None,
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
        if precopied:  # the final pass, after the pre-copy: what it still moved
            details["final_pass"] = _stats("".join(said))
        info = {
            "format": EXPORT_FORMAT,
            "backend": NAME,
            "checkpoint_id": me,
            "mount": target.mount.mount_point,
            "created": common.utc_now(),
            **details,
        }
        if dest.local:
            export_dir = dest.path(me)
            os.rename(export_dir / f".{name}.part", export_dir / name)
            write_json(export_dir / f"{name}.export.json", info, sync=False)
        else:
            # still inside the window: a failure here fails the checkpoint before the
            # payload (a CRIU dump ends the tasks); one connection for both files
            with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as tmp:
                listing = ("\n".join(counter.entries) + "\n").encode("latin-1")
                Path(tmp, f"{name}.files").write_bytes(listing)
                write_json(Path(tmp, f"{name}.export.json"), info)
                rsync(
                    opts,
                    [str(Path(tmp, f"{name}.files")), str(Path(tmp, f"{name}.export.json")), dest.join(me) + "/"],
                    target=target,
                    what="uploading the file list and export.json",
                )
        ok = True
    except OSError as exc:
        raise fail(f"finishing the tree {tree} failed: {exc.strerror or exc}", target) from exc
    finally:
        progress.close(ok)
        if not ok:
            with contextlib.suppress(Exception):
                _remove(opts, me, name, scratch)
            if made_dir:
                common.remove_if_empty(dest.path(me))
    return Export(backend=NAME, ref=tree, path=dest.join(me), details=details)


def _remove(
    opts: RsyncOptions,
    checkpoint_id: str,
    name: str,
    scratch: Path | None,
    *,
    proven: bool = True,
    put: Sequence[str] = (),
) -> None:
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
            *(f"--include=/{extra}/***" for extra in put),
            "--exclude=*",
        ]
        rsync(
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
        rsync(
            opts,
            [str(Path(tmp, MANIFEST_NAME)), opts.dest.join(me) + "/"],
            target=target,
            what="uploading the manifest",
        )
        # --ignore-times: "s0\n" and "s1\n" have one size, and written within one
        # second one mtime: rsync's quick check would keep the old pointer
        rsync(
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
        raise fail(f"refusing to delete the export {me}: it is not checkpoint {target.checkpoint_id}'s", target)
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    _remove(opts, me, name, scratch, proven=unfinished, put=put_names(export))
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


# -- what travels beside the tree (CRIU's images, the destination's answer) ------------------


def put_names(export: Export) -> list[str]:
    """The directories the core put into this export (``details.put``): plain names only."""
    names = export.details.get("put") or ()
    return [n for n in names if _plain(n)] if isinstance(names, list) else []


def _plain(name: object) -> bool:
    try:
        plain_name(name)
    except SnapcoreError:
        return False
    return True


def put(target: Target, export: Export, parts: Mapping[str, Path]) -> dict[str, Any] | None:
    """``parts`` (name → directory) into a remote export directory, in one rsync: a
    scratch directory of symlinks named as the parts, followed (``--copy-dirlinks``).
    None for a local one: the core copies it there itself. Complete once the
    manifest copy follows it."""
    opts = RsyncOptions.from_mapping({**target.options_for(NAME), "dest": export.details.get("dest")}, target)
    if opts.dest.local:
        return None
    t = time.perf_counter()
    out: list[str] = []
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as tmp:
        os.chmod(tmp, 0o755)  # rsync gives the export directory the mode of this one
        for name, source in parts.items():
            os.symlink(os.path.abspath(source), os.path.join(tmp, plain_name(name)))
        rsync(
            opts,
            [*COPY_FLAGS, "--copy-dirlinks", "--stats", tmp + "/", opts.dest.join(target.checkpoint_id) + "/"],
            target=target,
            what=f"sending {', '.join(parts)}",
            on_out=out.append,
        )
    stats = _stats("".join(out))
    return {
        "files": stats.get("files", 0),
        "bytes": stats.get("bytes", 0),
        "ms": round((time.perf_counter() - t) * 1000, 3),
    }


def get(target: Target, export: Export, name: str, limit: int) -> bytes | None:
    """The small file ``name`` from a remote export directory (None: not there;
    ``None`` for a local one too: the core reads it there itself)."""
    opts = RsyncOptions.from_mapping({**target.options_for(NAME), "dest": export.details.get("dest")}, target)
    if opts.dest.local or not _plain(name):
        return None
    scratch = target.checkpoint_dir if target.checkpoint_dir.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="snapcore-rsync-", dir=scratch) as tmp:
        # 23: "No such file" (not written yet); --max-size: more than an answer is none
        rsync(
            opts,
            [f"--max-size={limit}", opts.dest.join(target.checkpoint_id, name), tmp + "/"],
            target=None,
            what=f"reading {name}",
            ok_codes=(0, 23),
        )
        try:
            return read_regular(Path(tmp, name), limit)
        except FileNotFoundError:
            return None
