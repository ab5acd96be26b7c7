"""Reading ``rsync`` exports back: ``verify`` (the tree, local or remote, against
the file list recorded beside it, :mod:`.rsync_files`) and ``restore`` (a copy of
a tree that verifies into a new, empty directory).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from snapcore import BackendError, Export, SnapcoreError, Target, plain_name, read_regular
from snapcore_tar import RSYNC, common
from snapcore_tar.common import manifest_problem, read_json
from snapcore_tar.rsync_dest import COPY_FLAGS, NAME, RsyncOptions, fail, rsync, sidecars
from snapcore_tar.rsync_files import compare, parse_file_list, scan_local, scan_remote


def _where(export: Export, target: Target) -> tuple[RsyncOptions, str, str]:
    """Options (dest = the export's directory's parent), checkpoint id, slug."""
    name = common.record_slug(export.details, target.mount.mount_point)
    path = str(export.path or "")
    parent, _, me = path.rstrip("/").rpartition("/")
    opts = RsyncOptions.from_mapping({**target.options_for(NAME), "dest": parent or "/"}, target)
    return opts, me, name


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
            found = scan_local(tree, entries)
        else:
            try:
                found = scan_remote(opts, opts.dest.join(me, name))
            except BackendError as exc:
                return [*problems, str(exc)]
        problems += compare(entries, found)
        if isinstance(info.get("files"), int) and info["files"] != len(entries):
            problems.append(f"the file list has {len(entries)} entries, export.json says {info['files']}")
    return problems


def restore(target: Target, export: Export, dest: Path) -> str:
    opts, me, name = _where(export, target)
    with sidecars(opts, me, name, None) as where:
        if not (where / f"{name}.export.json").is_file():
            raise fail(
                f"no complete rsync export of {name} in {opts.dest.join(me)} ({name}.export.json missing)", target
            )
    # never restore what verify would call DAMAGED (a tree swapped for a symlink
    # copies whatever it points to)
    problems = verify(target, export)
    if problems:
        raise fail(f"refusing to restore {opts.dest.join(me, name)}: {'; '.join(problems[:5])}", target)
    dest = Path(os.path.abspath(dest))
    created = common.prepare_restore_dir(dest, RSYNC)
    source = opts.dest.join(me, name) + "/"
    try:
        rsync(opts, [*COPY_FLAGS, source, str(dest) + "/"], target=target, what=f"restoring {source}")
    except BaseException:
        common.empty_restore_dir(dest, created)
        raise
    return f"restored the tree {source} into {dest}"
