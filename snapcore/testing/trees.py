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
import subprocess
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


MiB = 1 << 20


def make_every_kind(root: Path) -> None:
    """Every kind of file a backup must keep, with owners, modes, times, xattrs, ACLs."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text("hello\n")
    (root / "dir" / "random.bin").write_bytes(os.urandom(MiB + 12345))
    (root / "dir" / "sub" / "deep.txt").write_text("deep\n" * 1000)
    # odd names: a newline, non-UTF-8 bytes, an arrow, quotes, spaces
    (root / "dir" / "new\nline").write_text("nl")
    (root / os.fsdecode(b"latin1-\xe9t\xe9")).write_text("bytes")
    (root / "arrow -> not a link").write_text("arrow")
    (root / 'quote"s and spaces').write_text("q")
    # hard links
    (root / "hard-a").write_text("linked\n")
    os.link(root / "hard-a", root / "dir" / "hard-b")
    # symlinks: relative, absolute (dangling here), to a directory
    os.symlink("small.txt", root / "link-rel")
    os.symlink("/nonexistent/absolute", root / "link-abs")
    os.symlink("dir/sub", root / "link-dir")
    # device nodes and a fifo
    os.mknod(root / "char-dev", 0o620 | 0o020000, os.makedev(1, 3))
    os.mknod(root / "block-dev", 0o660 | 0o060000, os.makedev(7, 200))
    os.mkfifo(root / "fifo", 0o640)
    # a sparse file: 32 MiB with two small extents of data
    with open(root / "sparse", "wb") as f:
        f.seek(8 * MiB)
        f.write(b"middle" * 1000)
        f.truncate(32 * MiB)
        f.seek(32 * MiB - 4)
        f.write(b"end!")
    # modes and owners
    os.chmod(root / "small.txt", 0o4751)
    os.chmod(root / "dir" / "sub", 0o1777)
    os.chown(root / "small.txt", 1234, 5678)
    os.lchown(root / "link-rel", 4321, 8765)
    os.chown(root / "dir", 2000, 3000)
    # xattrs (user and trusted namespaces) and ACLs (access and default)
    os.setxattr(root / "small.txt", "user.color", b"blue")
    os.setxattr(root / "dir" / "random.bin", "trusted.snapcore", b"\x00\x01binary\xff")
    subprocess.run(["setfacl", "-m", "u:1234:rw,g:5678:r", str(root / "empty")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "dir")], check=True)
    # times, to the nanosecond
    for i, rel in enumerate(["empty", "small.txt", "dir/random.bin", "sparse", "dir/sub/deep.txt", "dir"]):
        os.utime(root / rel, ns=(1_600_000_000_123_456_789 + i, 1_500_000_000_987_654_321 + i * 1000))
    os.utime(root / "link-rel", ns=(1_400_000_000_000_000_001, 1_400_000_000_000_000_002), follow_symlinks=False)
