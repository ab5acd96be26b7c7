"""``snapcore restore --safe``: a restored copy without what could hand out root.

By default a restore is faithful, as GNU tar and rsync are for root: device nodes,
FIFOs, sockets, setuid/setgid bits and file capabilities come back as they were.
That is right for one's own checkpoint and wrong for an export of unknown origin: a
block device node of the root disk, world-writable, or a setuid-root shell is a way
to root for whoever can reach the restored tree.

With ``--safe`` the backend restores into a private staging directory (mode 0700,
next to the destination, so nobody else can reach the tree while it is unsafe); the
tree is then defused (special files removed, setuid/setgid bits and
``security.capability`` cleared) and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snapcore.errors import SnapcoreError

CAPABILITY_XATTR = "security.capability"


@dataclass(slots=True)
class Defused:
    """What :func:`defuse` took out of a tree (paths relative to it)."""

    removed: list[str] = field(default_factory=list)
    cleared_setid: list[str] = field(default_factory=list)
    cleared_caps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not (self.removed or self.cleared_setid or self.cleared_caps):
            return "safe mode: nothing to defuse"
        parts = []
        for what, names in (
            ("removed special files", self.removed),
            ("cleared setuid/setgid on", self.cleared_setid),
            ("cleared file capabilities on", self.cleared_caps),
        ):
            if names:
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                shown = ", ".join(repr(n) for n in names[:5]) + more
                parts.append(f"{what} {len(names)} ({shown})")
        return "safe mode: " + "; ".join(parts)


def defuse(root: Path) -> Defused:
    """Remove device nodes, FIFOs and sockets under ``root``; clear setuid, setgid and
    file capabilities of its regular files. Never follows a symlink (the walk is by
    descriptor)."""
    done = Defused()
    for dirpath, _, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:  # directories and symlinks are left as they are
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if (
                stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode)
                or stat.S_ISFIFO(st.st_mode)
                or (stat.S_ISSOCK(st.st_mode))
            ):
                os.unlink(name, dir_fd=dirfd)
                done.removed.append(rel)
            elif stat.S_ISREG(st.st_mode):
                _defuse_file(name, dirfd, rel, done)
    return done


def _defuse_file(name: str, dirfd: int, rel: str, done: Defused) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # pragma: no cover - nobody else can reach the staging tree
            return
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            done.cleared_setid.append(rel)
        try:
            os.removexattr(fd, CAPABILITY_XATTR)
            done.cleared_caps.append(rel)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise
    finally:
        os.close(fd)


@dataclass(slots=True)
class Staging:
    """Where to restore (``tree``); after the ``with``, what was defused."""

    tree: Path
    defused: Defused = field(default_factory=Defused)


@contextlib.contextmanager
def staged(dest: Path) -> Iterator[Staging]:
    """Restore into ``staging.tree``, inside a new 0700 directory beside ``dest``: at
    the end of the ``with`` it is defused and moved to ``dest`` (which must be missing
    or an empty directory). On failure the staging directory goes."""
    dest = Path(os.path.abspath(dest))
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise SnapcoreError(f"{dest} exists and is not an empty directory: restore into a new one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    wrapper = Path(tempfile.mkdtemp(prefix=".snapcore-safe-", dir=dest.parent))  # 0700
    staging = Staging(tree=wrapper / "tree")
    try:
        yield staging
        staging.defused = defuse(staging.tree)
        if dest.is_dir():
            dest.rmdir()  # empty: checked before the restore
        os.rename(staging.tree, dest)
    except BaseException:
        _remove_staging(wrapper)
        raise
    wrapper.rmdir()


def _remove_staging(wrapper: Path) -> None:
    import shutil

    with contextlib.suppress(OSError):
        shutil.rmtree(wrapper)
