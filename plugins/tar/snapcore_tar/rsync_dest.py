"""Where ``rsync`` trees go and how rsync reaches them.

A destination (``options.rsync.dest``) is a local directory, an rsync daemon
module (``rsync://HOST[:PORT]/MODULE[/PATH]``, ``HOST::MODULE[/PATH]``) or a path
over ssh (``[USER@]HOST:PATH``): :class:`Dest` parses it, :class:`RsyncOptions`
adds how to connect (``rsh``, ``password_file``, ``timeout``), and :func:`rsync`
runs every rsync command with those options. A remote export's small files (its
``export.json``, manifest copy, file list, the ``latest`` pointer) are read
through a scratch copy (:func:`sidecars`, :func:`read_latest`).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore import BackendError, Target
from snapcore_tar import RSYNC, common
from snapcore_tar.common import MANIFEST_NAME, tool
from snapcore_tar.runner import run

NAME = RSYNC
#: What every tree keeps: -a plus hard links, ACLs, xattrs, sparse files, numeric ids.
#: --modify-window=-1 compares times to the nanosecond: with the default, rsync leaves
#: a symlink made in the current second with the time of its own creation.
COPY_FLAGS = ("-aHAXS", "--numeric-ids", "--modify-window=-1")
_REMOTE_SSH = re.compile(r"^(?:[^@/:\s]+@)?[^/:\s]+:(?!:)")


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


def fail(message: str, target: Target | None) -> BackendError:
    return BackendError(message, mount=target.mount.mount_point if target else None, backend=NAME)


def rsync(
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
            rsync(
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
        code = rsync(
            opts,
            [opts.dest.join(f"{name}.latest"), tmp + "/"],
            target=None,
            what="reading the latest export pointer",
            ok_codes=(0, 23),
        )
        if code != 0:
            return None
        return common.read_latest(Path(tmp), name)
