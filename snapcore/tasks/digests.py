"""What the tasks' files held, and whether a tree still holds it: the seed's worry
("a good chance they will successfully open the wrong file after c/r") turned into
a check that runs before CRIU does.

At checkpoint time:

* :func:`digest_files`, once the change watch runs and before anything is frozen:
  the sha256 of each regular file the tasks reach by a name on the checkpoint's
  mounts (on every mount for a move to another host: the destination's own system
  files are checked by content too), up to the policy's
  ``digest_limit`` (default 16 MiB: sha256 runs at 0.5-1.5 GB/s here, so one file costs
  at most ~30 ms, and none of it inside a freeze; ``all``: every file), read through
  the task's own descriptor or mapping (``/proc/PID/fd/N``: the very inode);
* :func:`at_freeze`, once the tasks are stopped: size and mtime as they are then
  (a running program keeps writing until it stops); a digest taken before a change
  is dropped, with a note;
* :func:`forget_changed`: a file someone else changed while the tasks were stopped
  (``on_change: warn``) is marked ``changed``: the image holds that change.

:func:`check_files` compares a tree (``/`` after ``restore --in-place``, the copy
after ``--to DIR``) with a manifest's ``files``: each named file is there, of the
same kind, size and mtime, with the recorded sha256; a deleted or renamed-over one
has its ghost copy, intact. On another host (``restore --from EXPORT -- CMD``) the
files on mounts the checkpoint did not image (a "similar" node's libraries and
binaries, the seed's words) are checked where they were, by size and sha256: their
mtimes are that host's own. The manifest is untrusted input: a path that is not
absolute, holds ``..`` or leads out of the tree through a symlink is a problem, never
followed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from snapcore.tasks.inventory import FileState, Inventory

CHUNK = 1 << 20
#: The file states whose content is at a name (the others are in ghost copies).
NAMED = (FileState.PRESENT, FileState.RENAMED)


def sha256_of(path: str, limit: int, *, nofollow: bool = False) -> str | None:
    """The sha256 of the file at ``path``, None if it is longer than ``limit``.
    ``nofollow``: a path from a manifest, whose last part must be no symlink and a
    regular file (``/proc/PID/fd/N``, which the inventory reads, is a link)."""
    digest = hashlib.sha256()
    size = 0
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW | os.O_NONBLOCK if nofollow else 0)
    fd = os.open(path, flags)
    if nofollow and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(0, "not a regular file")
    with open(fd, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            digest.update(chunk)
    return digest.hexdigest()


def digest_files(inventory: Inventory, limit: int, mounts: Iterable[str] | None) -> Inventory:
    """The inventory with ``sha256`` for each named regular file up to ``limit`` bytes
    on ``mounts`` (the checkpoint's: the others, the system's libraries on ``/`` say,
    are checked by size and mtime alone), or on every mount (None: a move, whose
    destination has libraries of its own)."""
    ours = set(mounts) if mounts is not None else None
    files = []
    for f in inventory.files:
        if f.kind != "file" or f.state not in NAMED or limit <= 0 or (ours is not None and f.mount_point not in ours):
            files.append(f)
            continue
        if f.size > limit:
            files.append(replace(f, digest_note=f"not digested: over digest_limit ({limit} bytes)"))
            continue
        try:
            sha = sha256_of(f.via, limit)
        except OSError as exc:
            files.append(replace(f, digest_note=f"not digested: {exc.strerror or exc}"))
            continue
        note = None if sha else f"not digested: it grew over digest_limit ({limit} bytes)"
        files.append(replace(f, sha256=sha, digest_note=note))
    return replace(inventory, files=tuple(files))


def at_freeze(inventory: Inventory) -> Inventory:
    """Size and mtime once the tasks are stopped; a digest of older content dropped."""
    files = []
    for f in inventory.files:
        try:
            st = os.stat(f.via)
        except OSError:
            files.append(f)
            continue
        if (st.st_size, st.st_mtime_ns) == (f.size, f.mtime_ns):
            files.append(f)
            continue
        changed = replace(f, size=st.st_size, mtime_ns=st.st_mtime_ns)
        if f.sha256 is not None:
            changed = replace(changed, sha256=None, digest_note="not digested: written to until the tasks stopped")
        files.append(changed)
    return replace(inventory, files=tuple(files))


def forget_changed(inventory: Inventory, keys: Iterable[tuple[int, int]]) -> Inventory:
    """Files (``(dev, ino)``) changed by someone else while the tasks were stopped."""
    wanted = set(keys)
    if not wanted:
        return inventory
    files = [
        replace(f, changed=True, sha256=None, digest_note="changed while the tasks were stopped")
        if f.key in wanted
        else f
        for f in inventory.files
    ]
    return replace(inventory, files=tuple(files))


# -- the check ---------------------------------------------------------------------------


def _inside(root: Path, recorded: object, mount: object = "/") -> tuple[Path | None, str | None]:
    """Where an absolute path from a manifest is, ``root`` holding its ``mount``'s
    tree (``/`` and ``root=/``: where it was), or why it cannot be."""
    if not isinstance(recorded, str) or not recorded.startswith("/") or "\x00" in recorded:
        return None, f"{recorded!r}: not an absolute path"
    if ".." in recorded.split("/"):
        return None, f"{recorded}: holds '..'"
    if not isinstance(mount, str) or not mount.startswith("/"):
        return None, f"{recorded}: its mount {mount!r} is not an absolute path"
    prefix = mount.rstrip("/") + "/"
    if mount != "/" and recorded != mount.rstrip("/") and not recorded.startswith(prefix):
        return None, f"{recorded}: not on its mount {mount}"
    where = root / recorded[len(mount.rstrip("/")) :].lstrip("/")
    real_root = os.path.realpath(root)
    real = os.path.realpath(where.parent) if where != root else real_root  # the last part is lstat'ed
    if real_root != "/" and real != real_root and not real.startswith(real_root + "/"):
        return None, f"{recorded}: leads out of {root} through a symlink"
    return where, None


def _check_named(
    root: Path, mount: object, entry: Mapping[str, Any], all_digests: bool, *, mtime_too: bool = True
) -> list[str]:
    shown = entry.get("host_path") or entry.get("path")
    where, problem = _inside(root, shown, mount)
    if where is None:
        return [str(problem)]
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        return [f"{where}: missing"]
    except OSError as exc:
        return [f"{where}: {exc.strerror or exc}"]
    kind = entry.get("kind")
    if kind == "dir":
        return [] if stat.S_ISDIR(st.st_mode) else [f"{where}: not a directory"]
    if not stat.S_ISREG(st.st_mode):
        return [f"{where}: not a regular file"]
    if entry.get("changed"):
        return []  # the image holds a change made under the stopped tasks (on_change: warn)
    problems = []
    size, mtime = entry.get("size"), entry.get("mtime_ns")
    if isinstance(size, int) and st.st_size != size:
        problems.append(f"{where}: {st.st_size} bytes, the checkpoint's had {size}")
    if mtime_too and isinstance(mtime, int) and st.st_mtime_ns != mtime:
        problems.append(f"{where}: modified at another time than the checkpoint's")
    sha = entry.get("sha256")
    if not problems and (isinstance(sha, str) or all_digests):
        try:
            now = sha256_of(os.fspath(where), st.st_size, nofollow=True)
        except OSError as exc:
            return [f"{where}: {exc.strerror or exc}"]
        if isinstance(sha, str) and now != sha:
            problems.append(f"{where}: other content than the checkpoint's (sha256 differs)")
    return problems


def _check_ghost(entry: Mapping[str, Any], ghost_dir: Path | None = None) -> list[str]:
    name = entry.get("path")
    ghost = entry.get("ghost")
    if not isinstance(ghost, Mapping) or not isinstance(ghost.get("path"), str):
        note = ghost.get("note") if isinstance(ghost, Mapping) else None
        return [f"{name} ({entry.get('state')}): no copy of its content ({note or 'none recorded'})"]
    path = str(ghost["path"])
    if ghost_dir is not None:
        # the copy travelled with an export: in its ghosts directory, by its own name
        # only (the manifest is untrusted: no other path is ever read)
        base = os.path.basename(path)
        if base in ("", ".", "..") or "\0" in base:
            return [f"{name} ({entry.get('state')}): its ghost copy has no usable name ({path!r})"]
        path = str(ghost_dir / base)
    size = ghost.get("size")
    try:
        # the manifest names the copy: a regular file of the recorded size, never
        # through a symlink, never a device (/dev/zero would never end)
        now = sha256_of(path, size if isinstance(size, int) and size >= 0 else 0, nofollow=True)
    except OSError as exc:
        return [f"{name} ({entry.get('state')}): its ghost copy {path}: {exc.strerror or exc}"]
    if isinstance(ghost.get("sha256"), str) and now != ghost["sha256"]:
        return [f"{name} ({entry.get('state')}): its ghost copy {path} is not the content copied"]
    return []


def check_files(
    files: Sequence[Mapping[str, Any]],
    trees: Mapping[str, Path] | None = None,
    *,
    ghosts: bool = True,
    all_digests: bool = False,
    ghost_dir: Path | None = None,
    similar_host: bool = False,
) -> list[str]:
    """What differs between the trees and a manifest's ``files``, one line each (none:
    they hold what the tasks had). ``trees``: where each mount's tree is (a restore
    ``--to``); files on other mounts are not checked, unless ``similar_host`` (another
    host, where the program is to run: they are checked where they were, by size and
    sha256, not mtime); None: every file where it was.
    ``ghosts``: check deleted files' copies too (they are in the checkpoint's state
    directory); ``all_digests``: hash every file, also those recorded without a
    digest (a digest, when recorded, is always checked); ``ghost_dir``: the copies are
    there (an export's ``ghosts``), found by their file names."""
    problems: list[str] = []
    for entry in files:
        if not isinstance(entry, Mapping):
            problems.append(f"a file record is a {type(entry).__name__}, not an object")
            continue
        kind, state = entry.get("kind"), entry.get("state")
        if kind not in ("file", "dir"):
            continue  # devices, FIFOs, sockets: CRIU's, not a tree's
        elsewhere = trees is not None and entry.get("mount") not in trees
        if elsewhere and not similar_host:
            continue
        if state in (FileState.PRESENT.value, FileState.RENAMED.value):
            if elsewhere:
                problems += _check_named(Path("/"), "/", entry, all_digests, mtime_too=False)
            elif trees is None:
                problems += _check_named(Path("/"), "/", entry, all_digests)
            else:
                mount = str(entry.get("mount"))
                problems += _check_named(trees[mount], mount, entry, all_digests)
        elif state in (FileState.DELETED.value, FileState.RENAMED_OVER.value) and kind == "file":
            if ghosts and not elsewhere:
                problems += _check_ghost(entry, ghost_dir)
        else:
            problems.append(f"{entry.get('path')!r}: unknown state {state!r}")
    return problems
