"""Writing ``tar`` exports (the format is in :mod:`.tar_format`): checking the
destination, the archive itself (level 0, or the next increment of the newest
complete chain in the destination), then, after the thaw, its checksum and sync
(``finish``), the manifest copy and ``latest`` pointer (``publish``), and
deleting an export again (``discard``, ``discard_partial``) without breaking a
chain that later increments build on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore import BackendError, Export, Image, StillNeeded, Target, plain_name, syncfs, write_atomic
from snapcore_tar import common
from snapcore_tar.common import (
    EXPORT_FORMAT,
    MANIFEST_NAME,
    manifest_problem,
    read_json,
    read_latest,
    slug,
    tool,
    write_json,
)
from snapcore_tar.progress import Progress, bar_wanted
from snapcore_tar.runner import LineCounter, SizeWatcher, run, sha256_file
from snapcore_tar.tar_format import CREATE_FLAGS, NAME, TarOptions, archive_name, fail, record_chain

log = logging.getLogger(__name__)


# -- prepare ----------------------------------------------------------------------------


def prepare(target: Target, dest: Path) -> None:
    opts = TarOptions.of(target)
    tool("tar", NAME)
    if opts.compress.tool:
        tool(opts.compress.tool, NAME)
    common.check_dest_dir(dest, target, NAME)


# -- export -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    level: int
    chain: list[str]
    parent_snar: Path | None


def _plan(target: Target, dest: Path, name: str, opts: TarOptions) -> _Plan:
    """Level 0, or the next increment of the newest complete chain in ``dest``."""
    me = target.checkpoint_id
    full = _Plan(level=0, chain=[me], parent_snar=None)
    if not opts.incremental:
        return full
    prev = read_latest(dest, name)
    if prev is None or prev == me:
        return full
    prev_dir = dest / prev
    why: str | None = None
    info: dict[str, Any] = {}
    try:
        info = read_json(prev_dir / f"{name}.export.json")
    except (OSError, ValueError) as exc:
        why = f"cannot read it: {exc}"
    if why is None and (info.get("backend") != NAME or not info.get("incremental")):
        why = "it is not an incremental tar export"
    if why is None:
        why = manifest_problem(prev_dir, prev)
    snar = prev_dir / f"{name}.snar"
    if why is None and not snar.is_file():
        why = f"its snapshot file {snar} is missing"
    chain: list[str] = []
    if why is None:
        try:
            chain = record_chain(info)
        except ValueError as exc:
            why = str(exc)
    if why is None:
        missing = [c for c in chain if not (dest / c / f"{name}.export.json").is_file()]
        if missing:
            why = f"its chain is broken ({', '.join(missing)} missing)"
    if why is not None:
        log.warning(
            "%s: starting a new level-0 archive: the previous export %s cannot be continued: %s",
            target.mount.mount_point,
            prev,
            why,
        )
        return full
    level = info.get("level", 0)
    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        log.warning("%s: starting a new level-0 archive: %s has no valid level", target.mount.mount_point, prev)
        return full
    level += 1
    if opts.full_every and level > opts.full_every:
        return full
    return _Plan(level=level, chain=[*chain, me], parent_snar=snar)


def export(target: Target, image: Image, dest: Path) -> Export:
    """Write the archive of ``image`` under ``dest/ID/``; nothing looks complete on failure."""
    opts = TarOptions.of(target)
    if not image.path:
        raise fail(f"the {image.backend} image has no path to copy", target)
    src = Path(image.path)
    name = slug(target.mount.mount_point)
    export_dir = dest / target.checkpoint_id
    plan = _plan(target, dest, name, opts)
    archive = export_dir / archive_name(name, opts.compress)
    part = export_dir / f".{archive.name}.part"
    snar = export_dir / f"{name}.snar"
    snar_part = export_dir / f".{name}.snar.part"
    made_dir = not export_dir.exists()
    try:
        export_dir.mkdir(mode=0o755, exist_ok=True)
    except OSError as exc:
        raise fail(f"cannot create {export_dir}: {exc.strerror}", target) from exc
    if archive.exists() or (export_dir / f"{name}.export.json").exists():
        raise fail(f"{archive} already exists: checkpoint ids must be unique per dest", target)

    argv = [tool("tar", NAME), "--create", f"--file={part}", f"--directory={src}", *CREATE_FLAGS]
    argv += opts.compress.create
    if opts.incremental:
        # device numbers change between snapshots (btrfs subvolumes): compare inodes only
        argv += [f"--listed-incremental={snar_part}", "--no-check-device"]
    if bar_wanted(sys.stderr):
        argv.append("--verbose")  # one line per member: the file count of the bar
    argv.append(".")

    total_bytes = total_files = None
    try:
        st = os.statvfs(src)
        total_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
        total_files = st.f_files - st.f_ffree
    except OSError:
        pass
    progress = Progress(
        f"tar {target.mount.mount_point} → {archive}",
        total_bytes=total_bytes if opts.compress.name == "none" else None,
        total_files=total_files,
    )
    watcher: SizeWatcher | None = None
    counter = LineCounter(progress) if progress.bar else None
    ok = False
    try:
        # a leftover of a crashed run goes; tar creates the file itself: truncating an
        # existing file would make ext4 (auto_da_alloc) write it all back at close
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        if plan.parent_snar is not None:
            shutil.copyfile(plan.parent_snar, snar_part)
        if progress.bar:
            watcher = SizeWatcher(part, progress)
            watcher.start()
        result = run(
            argv,
            target=target,
            backend=NAME,
            what="GNU tar",
            on_out=counter,
            ok_codes=(0, 1),
            hint=lambda: common.full_hint(export_dir),
        )
        size = part.stat().st_size
        warnings: list[str] = []
        if result.exit_code == 1:
            # "file changed as we read it": the copy is complete but not a point in time
            warnings.append(f"GNU tar: some files changed while they were read: {common.tail(result.stderr)}")
            log.warning("%s: %s", target.mount.mount_point, warnings[-1])
        os.chmod(part, 0o600)
        os.rename(part, archive)
        if opts.incremental:
            os.rename(snar_part, snar)
        details: dict[str, Any] = {
            "dest": str(dest),
            "slug": name,
            "archive": archive.name,
            # computed after the thaw, in finish(): hashing while tar writes halves its speed
            "sha256": None,
            "bytes": size,
            "files": counter.count if counter is not None else None,
            "compress": opts.compress.name,
            "incremental": opts.incremental,
            "level": plan.level,
            "chain": plan.chain,
            "snar": snar.name if opts.incremental else None,
            "warnings": warnings,
        }
        write_json(
            export_dir / f"{name}.export.json",
            {
                "format": EXPORT_FORMAT,
                "backend": NAME,
                "checkpoint_id": target.checkpoint_id,
                "mount": target.mount.mount_point,
                "created": common.utc_now(),
                **details,
            },
            sync=False,
        )
        ok = True
    except OSError as exc:
        raise fail(f"writing {archive} failed: {exc.strerror or exc}", target) from exc
    finally:
        progress.close(ok)
        if watcher is not None:
            watcher.stop()
        if not ok:
            for path in (part, snar_part, archive, snar, export_dir / f"{archive.name}.sha256"):
                with contextlib.suppress(OSError):
                    path.unlink()
            if made_dir:
                common.remove_if_empty(export_dir)
    return Export(backend=NAME, ref=str(archive), path=str(export_dir), details=details)


# -- after the checkpoint ---------------------------------------------------------------


def finish(target: Target, export: Export) -> None:
    """After the thaw, before the manifest says ok: checksum and sync the archive.

    The archive was just written, so the checksum reads it from the page cache. A
    failure here fails the checkpoint (the core's ``finish`` step).
    """
    export_dir = Path(export.path or Path(export.ref).parent)
    name = common.record_slug(export.details, target.mount.mount_point)
    archive = Path(export.ref)
    sha = sha256_file(archive)
    write_atomic(export_dir / f"{archive.name}.sha256", f"{sha}  {archive.name}\n".encode(), sync=False)
    info_path = export_dir / f"{name}.export.json"
    info = read_json(info_path)
    info["sha256"] = sha
    write_json(info_path, info, sync=False)
    syncfs(export_dir)  # the archive and its sidecars, before the manifest says "complete"


def publish(target: Target, export: Export, manifest_text: str) -> None:
    """Once the manifest is written: its copy beside the archive, then ``latest``."""
    export_dir = Path(export.path or Path(export.ref).parent)
    name = common.record_slug(export.details, target.mount.mount_point)
    common.copy_manifest(export_dir, manifest_text)
    dest = export_dir.parent
    write_atomic(common.latest_pointer(dest, name), f"{target.checkpoint_id}\n".encode())


def discard(target: Target, export: Export, *, unfinished: bool = False) -> None:
    """Delete this export's files; refuse to break a chain that later exports build on.

    Only what its ``export.json`` proves is this checkpoint's tar export goes (a
    manifest is untrusted input); without that record, only the ``.part`` files,
    unless ``unfinished`` (the controller's own journal says the export never
    returned, so its record was never written)."""
    export_dir = Path(export.path or Path(export.ref).parent)
    name = common.record_slug(export.details, target.mount.mount_point)
    dest = export_dir.parent
    me = export_dir.name
    children = []
    with contextlib.suppress(OSError):
        for other in dest.iterdir():
            if other.name == me or not other.is_dir():
                continue
            try:
                info = read_json(other / f"{name}.export.json")
            except (OSError, ValueError):
                continue
            with contextlib.suppress(ValueError):  # a broken record builds on nothing
                if me in record_chain(info)[:-1]:
                    children.append(other.name)
    if children:
        raise StillNeeded(
            f"export {me} is the base of later increments ({', '.join(sorted(children))}): discard those first",
            mount=target.mount.mount_point,
            backend=NAME,
        )
    archive_file = plain_name(export.details.get("archive") or Path(export.ref).name, what="the archive")
    if export_dir.name != target.checkpoint_id:
        raise BackendError(
            f"refusing to delete {export_dir}: it is not the export directory of checkpoint {target.checkpoint_id}",
            mount=target.mount.mount_point,
            backend=NAME,
        )
    proof = common.proof_of(export_dir, name, target.checkpoint_id, NAME)
    if proof is not None and proof.get("archive") != archive_file:
        raise BackendError(
            f"refusing to delete {export_dir / archive_file}: the export's record names {proof.get('archive')!r}",
            mount=target.mount.mount_point,
            backend=NAME,
        )
    if proof is None and not unfinished and os.path.lexists(export_dir / archive_file):
        raise BackendError(
            f"refusing to delete {export_dir / archive_file}: no {name}.export.json there proves it is checkpoint "
            f"{target.checkpoint_id}'s tar export",
            mount=target.mount.mount_point,
            backend=NAME,
        )
    record = export_dir / f"{name}.export.json"
    marker = export_dir / common.discarding_name(name)
    if proof is not None:
        with contextlib.suppress(FileNotFoundError):
            os.rename(record, marker)  # first: the export stops looking complete
    made = [export_dir / f".{archive_file}.part", export_dir / f".{name}.snar.part"]
    if proof is not None or unfinished:
        made += [export_dir / archive_file, export_dir / f"{archive_file}.sha256", export_dir / f"{name}.snar"]
    for path in [*made, marker]:  # the proof last: a delete that stops halfway can go on
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if read_latest(dest, name) == me:
        with contextlib.suppress(FileNotFoundError):
            common.latest_pointer(dest, name).unlink()
    _drop_dir_if_done(export_dir)


def discard_partial(target: Target, dest: Path) -> list[str]:
    """Remove what an export of ``target`` that never returned (its controller was
    killed) left in ``dest/ID/``: the ``.part`` files, and an archive renamed into
    place before its ``export.json`` was written."""
    name = slug(target.mount.mount_point)
    archive = archive_name(name, TarOptions.of(target).compress)
    export_dir = dest / target.checkpoint_id
    before = common.names_in(export_dir)
    if not before:
        return []
    discard(
        target,
        Export(
            backend=NAME,
            ref=str(export_dir / archive),
            path=str(export_dir),
            details={"slug": name, "archive": archive},
        ),
        unfinished=True,
    )
    gone = before - common.names_in(export_dir)
    return [f"removed the unfinished export file {export_dir / n}" for n in sorted(gone)]


def _drop_dir_if_done(export_dir: Path) -> None:
    """Remove the checkpoint's export directory once no export is left in it."""
    try:
        left = [p.name for p in export_dir.iterdir()]
    except OSError:
        return
    if all(n == MANIFEST_NAME or n.startswith(".") for n in left):
        with contextlib.suppress(FileNotFoundError):
            (export_dir / MANIFEST_NAME).unlink()
        common.remove_if_empty(export_dir)
