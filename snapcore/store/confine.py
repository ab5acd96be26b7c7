"""Paths taken from manifests, export records and listings: untrusted input.

snapcore runs as root, and its exports travel between machines: every name read
from a manifest copy, an export record or an archive listing may have been written
by someone else. Nothing such a name says is joined onto a directory before it went
through here.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapcore.errors import Untrusted

__all__ = ["Untrusted", "beneath", "clean_mount", "plain_name"]


def clean_mount(value: object, *, where: str = "a target's mount") -> str:
    """``value`` as a mount point read from a manifest: an absolute path in normal
    form (no ``.``, ``..`` or empty components), no NUL or newline. Raises
    :class:`Untrusted` otherwise."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise Untrusted(f"{where} {value!r} is not an absolute path: refusing")
    if "\0" in value or "\n" in value or len(value) > 4096:
        raise Untrusted(f"{where} {value!r} holds a NUL or newline, or is too long: refusing")
    if value != "/" and (value.endswith("/") or any(p in ("", ".", "..") for p in value[1:].split("/"))):
        raise Untrusted(f"{where} {value!r} is not in normal form (no '.', '..' or '//'): refusing")
    return value


def beneath(root: Path, mount: str) -> Path:
    """Where a target mounted at ``mount`` goes under ``root`` (``restore --to`` with
    several targets): ``root/srv/app`` for ``/srv/app``, never outside ``root``."""
    rel = clean_mount(mount).lstrip("/")
    path = root / rel if rel else root
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) != os.path.abspath(root):
        raise Untrusted(f"a target's mount {mount!r} leads outside {root}: refusing")  # pragma: no cover
    return path


def plain_name(value: object, *, what: str = "a name") -> str:
    """``value`` as one path component read from a record (a file or directory name
    inside an export directory, a checkpoint id in a chain): a non-empty string with
    no ``/``, NUL or newline, not ``.`` or ``..``, at most 255 bytes. Raises
    :class:`Untrusted` otherwise."""
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or any(c in value for c in "/\0\n")
        or len(value.encode("utf-8", "surrogateescape")) > 255
    ):
        raise Untrusted(f"{what} {value!r} is not a plain file name: refusing")
    return value
