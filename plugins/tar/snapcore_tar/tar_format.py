"""What a ``tar`` export is: one GNU tar archive per target and checkpoint.

Archives keep what a backup must (numeric owners, modes, times, hard links,
symlinks, device nodes, xattrs, ACLs, sparse files) and stay on one filesystem.
With ``incremental: true`` they form chains made with ``--listed-incremental``:
level 0, then increments, each with the snapshot file it left beside it; a
restore extracts the chain in order. See :mod:`snapcore_tar.common` for the layout.

This module holds what writing (:mod:`.tar_export`) and reading back
(:mod:`.tar_restore`) agree on: the compressions, GNU tar's flags, a target's
``tar`` options, and the export records that make a chain (:func:`chain_of`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore import BackendError, Target, Untrusted, plain_name
from snapcore_tar import TAR
from snapcore_tar.common import read_json

NAME = TAR


@dataclass(frozen=True, slots=True)
class Compression:
    name: str
    suffix: str
    tool: str | None
    create: tuple[str, ...]
    read: tuple[str, ...]


COMPRESSIONS: dict[str, Compression] = {
    "none": Compression("none", "", None, (), ()),
    "gzip": Compression("gzip", ".gz", "gzip", ("--gzip",), ("--gzip",)),
    # multi-threaded: the export may run inside the freeze window
    "zstd": Compression("zstd", ".zst", "zstd", ("--use-compress-program=zstd -T0 -q",), ("--zstd",)),
}

#: What every archive keeps. posix (pax) format: xattrs and ACLs need it.
CREATE_FLAGS = (
    "--format=posix",
    "--one-file-system",
    "--numeric-owner",
    "--sparse",
    "--acls",
    "--xattrs",
    "--xattrs-include=*",
    # ACLs travel as SCHILY.acl.*; keeping their raw xattrs too would store them twice
    "--xattrs-exclude=system.posix_acl_*",
)
EXTRACT_FLAGS = (
    "--numeric-owner",
    "--same-owner",
    "--same-permissions",
    "--acls",
    "--xattrs",
    "--xattrs-include=*",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TarOptions:
    compress: Compression
    incremental: bool
    full_every: int

    @classmethod
    def of(cls, target: Target) -> TarOptions:
        opts = target.options_for(NAME)
        name = opts.get("compress") or "none"
        if name not in COMPRESSIONS:
            raise BackendError(
                f"unknown compression {name!r} (none, gzip or zstd)", mount=target.mount.mount_point, backend=NAME
            )
        return cls(
            compress=COMPRESSIONS[name],
            incremental=bool(opts.get("incremental", False)),
            full_every=int(opts.get("full_every") or 0),
        )


def fail(message: str, target: Target | None) -> BackendError:
    return BackendError(message, mount=target.mount.mount_point if target else None, backend=NAME)


def archive_name(name: str, compress: Compression) -> str:
    return f"{name}.tar{compress.suffix}"


# -- chains -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Link:
    """One archive of a chain, as its ``export.json`` describes it."""

    checkpoint_id: str
    dir: Path
    info: Mapping[str, Any]

    @property
    def archive(self) -> Path:
        return self.dir / plain_name(self.info.get("archive"), what=f"{self.dir}: the archive")

    @property
    def compress(self) -> Compression:
        name = str(self.info.get("compress") or "none")
        if name not in COMPRESSIONS:
            raise BackendError(f"{self.dir}: unknown compression {name!r}", backend=NAME)
        return COMPRESSIONS[name]


def record_chain(info: Mapping[str, Any]) -> list[str]:
    """An export record's chain of checkpoint ids (untrusted: ``ValueError`` unless
    it is a list of strings)."""
    chain = info.get("chain") or []
    if not isinstance(chain, list):
        raise ValueError(f"its chain {chain!r} is not a list of checkpoint ids")
    try:
        return [plain_name(c, what="a chain entry") for c in chain]
    except Untrusted as exc:
        raise ValueError(str(exc)) from None


def chain_of(export_dir: Path, name: str) -> list[Link]:
    """The archives to extract, level 0 first, ending with the one in ``export_dir``."""
    try:
        info = read_json(export_dir / f"{name}.export.json")
    except FileNotFoundError:
        raise BackendError(
            f"no tar export named {name!r} in {export_dir} ({name}.export.json is missing)", backend=NAME
        ) from None
    except (OSError, ValueError) as exc:
        raise BackendError(f"{export_dir / (name + '.export.json')}: unreadable: {exc}", backend=NAME) from exc
    if info.get("backend") != NAME:
        raise BackendError(f"{export_dir}: {name} is a {info.get('backend')!r} export, not tar", backend=NAME)
    me = export_dir.name
    try:
        ids = record_chain(info) or [str(info.get("checkpoint_id") or me)]
    except ValueError as exc:
        raise BackendError(f"{export_dir}: {exc}", backend=NAME) from None
    links: list[Link] = []
    for cid in ids[:-1]:
        d = export_dir.parent / cid
        try:
            links.append(Link(cid, d, read_json(d / f"{name}.export.json")))
        except (OSError, ValueError) as exc:
            raise BackendError(
                f"the increment in {export_dir} needs the earlier export {cid}, expected beside it at {d}: {exc}",
                backend=NAME,
            ) from exc
    links.append(Link(ids[-1], export_dir, info))
    return links
