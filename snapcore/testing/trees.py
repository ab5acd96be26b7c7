"""A directory tree as a comparable value: what an image, an export or a restore must
keep, per path, for tests that compare a tree before and after.

:func:`describe_tree` with ``metadata=False`` gives each entry's type, mode and
content (a SHA-256 of a file, the target of a link): enough to say that a snapshot or
a restore holds the checkpoint's files. With ``metadata=True`` it gives everything a
bit-for-bit round trip must keep (owner, size, mtime, device numbers, sparseness of
large files, xattrs, hard links; atime excepted), as the tar and rsync exporters
promise. Keys are paths relative to the root, as bytes (names need not be UTF-8).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Files at least this large also record whether they are sparse (blocks < size / 4).
SPARSE_CHECK_BYTES = 16 << 20

Description = dict[bytes, tuple[Any, ...]]


def _sha256(path: bytes) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_tree(root: str | os.PathLike[str], *, skip: Iterable[str] = (), metadata: bool = False) -> Description:
    """Every entry below ``root`` (``root`` itself as ``b"."`` with ``metadata``); the
    names in ``skip`` are left out where they appear directly under ``root`` (e.g.
    ``lost+found``, a btrfs ``.snapshots``)."""
    base = os.fsencode(root)
    skipped = {os.fsencode(name) for name in skip}
    out: Description = {}
    inodes: dict[int, list[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if dirpath == base:
            dirnames[:] = [d for d in dirnames if d not in skipped]
            filenames = [f for f in filenames if f not in skipped]
        dirnames.sort()
        names = [*sorted(dirnames), *sorted(filenames)]
        if metadata and dirpath == base:
            names.insert(0, b".")
        for name in names:
            path = dirpath if name == b"." else os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            content: Any = None
            if kind == stat.S_IFREG:
                content = _sha256(path)
                inodes.setdefault(st.st_ino, []).append(rel)
            elif kind == stat.S_IFLNK:
                content = os.readlink(path)
            if not metadata:
                out[rel] = (st.st_mode, content)
                continue
            sparse = None
            if kind == stat.S_IFREG and st.st_size >= SPARSE_CHECK_BYTES:
                sparse = st.st_blocks * 512 < st.st_size // 4
            xattrs: dict[str, bytes] = {}
            if kind != stat.S_IFLNK:
                for key in sorted(os.listxattr(path, follow_symlinks=False)):
                    xattrs[key] = os.getxattr(path, key, follow_symlinks=False)
            out[rel] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size if kind != stat.S_IFDIR else None,
                None if rel == b"." else st.st_mtime_ns,
                st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None,
                content,
                sparse,
                tuple(sorted(xattrs.items())),
            )
    if not metadata:
        return out
    links = {rel: tuple(sorted(names)) for names in inodes.values() for rel in names if len(names) > 1}
    return {rel: (*desc, links.get(rel)) for rel, desc in out.items()}


def assert_same_tree(got: str | os.PathLike[str], expected: Description, *, skip: Iterable[str] = ()) -> None:
    """``got`` described as ``expected`` was (with metadata when it has them); the
    first difference is named."""
    metadata = any(len(desc) > 2 for desc in expected.values())
    actual = describe_tree(Path(got), skip=skip, metadata=metadata)
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, f"different names: missing {missing[:10]}, extra {extra[:10]}"
    for rel in expected:
        assert actual[rel] == expected[rel], f"{rel!r} differs: {actual[rel]} != {expected[rel]}"
