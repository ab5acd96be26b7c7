"""``snapcore diff ID1 [ID2]``: what changed between two checkpoints of a mount, or
between one and the live tree, as ``snapper status`` says it.

Each side is a tree read where it lies: a kept image that is a directory (a btrfs
snapshot), an export that is one (rsync), or, for the live side, the mount itself.
Per path, snapper's letters: ``+`` created, ``-`` deleted, ``t`` type, ``c`` content,
``p`` permissions, ``u`` owner, ``g`` group, ``x`` extended attributes, ``a`` ACLs.
Content is compared by size and, when the sizes agree but the times do not, by
SHA-256. Paths come from manifests (untrusted): only existing absolute directories
are walked, never followed through a symlink, and nothing is ever written.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from snapcore.errors import SnapcoreError, UsageError
from snapcore.store.manifest import Manifest, TargetRecord
from snapcore.store.records import export_of, image_of
from snapcore.tasks.digests import sha256_of

ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
#: Directories of a mount that are snapcore's, not the application's.
SKIP = (".snapshots",)


@dataclass(frozen=True, slots=True)
class Change:
    path: str
    #: snapper's letters (``+``, ``-``, or some of ``tcpugxa``)
    what: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "what": self.what}


def tree_of(manifest: Manifest, record: TargetRecord) -> Path:
    """Where the checkpoint's copy of ``record``'s mount can be read as a tree."""
    image, export = image_of(record), export_of(record)
    for candidate in (image.ref if image else None, export.ref if export else None):  # a tree, or not
        if isinstance(candidate, str) and os.path.isabs(candidate):
            path = Path(candidate)
            if path.is_dir() and not path.is_symlink():
                return path
    raise UsageError(
        f"checkpoint {manifest.id}, {record.mount}: no directory tree to compare "
        f"(imager {record.imager}, exporter {record.exporter or 'none'}): diff reads btrfs snapshots and rsync "
        "exports"
    )


def _entries(root: Path) -> dict[str, os.stat_result]:
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d not in SKIP]
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            try:
                found[os.path.relpath(path, root)] = os.lstat(path)
            except FileNotFoundError:  # the live tree changes as it is read
                continue
    return found


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        return {k: os.getxattr(path, k, follow_symlinks=False) for k in os.listxattr(path, follow_symlinks=False)}
    except OSError:
        return {}


def _same_bytes(a: str, b: str, size: int) -> bool:
    """Whether two regular files of ``size`` bytes hold the same bytes (one that is no
    longer a regular file, or grew, since it was listed: not the same)."""
    try:
        first = sha256_of(a, size, nofollow=True)
        return first is not None and first == sha256_of(b, size, nofollow=True)
    except OSError:
        return False


def _what(a: str, sa: os.stat_result, b: str, sb: os.stat_result) -> str:
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return "t"
    letters = ""
    if stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size or (sa.st_mtime_ns != sb.st_mtime_ns and not _same_bytes(a, b, sa.st_size)):
            letters += "c"
    elif (stat.S_ISLNK(sa.st_mode) and os.readlink(a) != os.readlink(b)) or (
        (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev
    ):
        letters += "c"
    if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode) and not stat.S_ISLNK(sa.st_mode):
        letters += "p"
    letters += "u" if sa.st_uid != sb.st_uid else ""
    letters += "g" if sa.st_gid != sb.st_gid else ""
    if not stat.S_ISLNK(sa.st_mode):
        xa, xb = _xattrs(a), _xattrs(b)
        plain = {k: v for k, v in xa.items() if k not in ACL_XATTRS}
        if plain != {k: v for k, v in xb.items() if k not in ACL_XATTRS}:
            letters += "x"
        if any(xa.get(k) != xb.get(k) for k in ACL_XATTRS):
            letters += "a"
    return letters


def diff_trees(old: Path, new: Path) -> list[Change]:
    """What changed from ``old`` to ``new``, sorted by path."""
    if old.is_symlink() or not old.is_dir() or new.is_symlink() or not new.is_dir():
        raise SnapcoreError(f"diff: {old} and {new} must both be directories")
    before, after = _entries(old), _entries(new)
    changes = [Change(p, "+") for p in after.keys() - before.keys()]
    changes += [Change(p, "-") for p in before.keys() - after.keys()]
    for path in before.keys() & after.keys():
        try:
            what = _what(str(old / path), before[path], str(new / path), after[path])
        except FileNotFoundError:  # gone from the live tree since it was listed
            what = "-"
        if what:
            changes.append(Change(path, what))
    return sorted(changes, key=lambda c: c.path)
