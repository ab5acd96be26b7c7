"""Deciding whether a tar archive may be extracted into a directory.

An archive is read by the same parser that will extract it: GNU tar's own
verbose listing (``tar -tvv --quoting-style=c --listed-incremental=/dev/null``),
so no header trick can make the check and the extraction see different names.
Refused, for any archive (snapcore's or not):

* absolute member names and hard-link targets, and any ``..`` component;
* a member, or a hard-link target, whose path goes through a symlink that an
  earlier member (of this archive or of an earlier archive of the chain) made;
* incremental records (``GNU.dumpdir``) whose names climb out or are absolute
  (GNU tar renames directories after them while extracting);
* member types a backup never holds (volume labels, multi-volume continuations).

GNU tar's own defences (it strips ``/``, skips ``..`` members, delays dangerous
symlinks) stay in place behind this check. :func:`scan` runs the listing of one
archive and checks it; the rest reads listing lines and needs no archive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from snapcore import BackendError
from snapcore_tar import TAR
from snapcore_tar.common import tool
from snapcore_tar.runner import LineCounter, run

#: first letter of a verbose listing line → member kind
MEMBER_TYPES = {
    "-": "file",
    "h": "hardlink",
    "l": "symlink",
    "d": "directory",
    "c": "char device",
    "b": "block device",
    "p": "fifo",
    "C": "file",  # contiguous file: a regular file for Linux
    "S": "file",  # old GNU sparse file
}
_MEMBER = re.compile(
    r"^(?P<type>\S)[-rwxsStTl?]{9}[.+]? (?P<owner>\S+) +(?P<size>\d+(?:, *\d+)?) +\S+ \S+ (?P<rest>\".*)$"
)
#: How every member line starts: a type letter and nine permission characters.
_MEMBER_START = re.compile(r"^\S[-rwxsStTl?]{9}[.+]? ")
_DUMPDIR = re.compile(r"^(?P<code>[YNDRTX]) (?P<name>.*)$")
_ESCAPES = {
    "\\": 0x5C,
    '"': 0x22,
    "n": 0x0A,
    "t": 0x09,
    "a": 0x07,
    "b": 0x08,
    "f": 0x0C,
    "r": 0x0D,
    "v": 0x0B,
    "?": 0x3F,
}


class UnsafeArchive(Exception):
    """The archive would write outside the directory, or cannot be judged."""


def unquote_c(text: str, start: int) -> tuple[bytes, int]:
    """Parse a C-quoted string of GNU tar's ``--quoting-style=c`` at ``text[start]``.

    Returns the raw bytes and the index after the closing quote.
    """
    if start >= len(text) or text[start] != '"':
        raise UnsafeArchive(f"expected a quoted name in {text!r}")
    out = bytearray()
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return bytes(out), i + 1
        if ch == "\\":
            i += 1
            if i >= len(text):
                break
            esc = text[i]
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                i += 1
            elif esc in "01234567":
                j = i
                while j < len(text) and j < i + 3 and text[j] in "01234567":
                    j += 1
                out.append(int(text[i:j], 8) & 0xFF)
                i = j
            else:
                raise UnsafeArchive(f"unknown escape \\{esc} in {text!r}")
            continue
        out.extend(ch.encode("latin-1"))
        i += 1
    raise UnsafeArchive(f"unterminated quoted name in {text!r}")


def components(raw: bytes, what: str) -> tuple[bytes, ...]:
    """Path components of a member name, refusing absolute names and ``..``."""
    shown = raw.decode("utf-8", "backslashreplace")
    if not raw:
        raise UnsafeArchive(f"{what} with an empty name")
    if raw.startswith(b"/"):
        raise UnsafeArchive(f"{what} {shown!r} has an absolute name")
    parts = raw.split(b"/")
    if b".." in parts:
        raise UnsafeArchive(f"{what} {shown!r} has a '..' component")
    return tuple(p for p in parts if p not in (b"", b"."))


def _show(parts: tuple[bytes, ...]) -> str:
    return "/".join(p.decode("utf-8", "backslashreplace") for p in parts) or "."


@dataclass(slots=True)
class Member:
    kind: str
    name: tuple[bytes, ...]
    link: tuple[bytes, ...] | None = None


@dataclass(slots=True)
class ScanState:
    """What the archives of a chain extracted so far leave in the directory."""

    symlinks: set[tuple[bytes, ...]] = field(default_factory=set)
    members: int = 0
    #: Inside a directory's incremental record (after a directory member, until an
    #: empty line): the only place a line that is no member may appear.
    in_record: bool = False

    def through_symlink(self, parts: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
        for k in range(1, len(parts)):
            if parts[:k] in self.symlinks:
                return parts[:k]
        return None

    def add(self, member: Member) -> None:
        via = self.through_symlink(member.name)
        if via is not None:
            raise UnsafeArchive(f"member {_show(member.name)!r} would be written through the symlink {_show(via)!r}")
        if member.link is not None:
            via = self.through_symlink(member.link)
            if via is not None:
                raise UnsafeArchive(
                    f"hard link {_show(member.name)!r} → {_show(member.link)!r} goes through the symlink {_show(via)!r}"
                )
        if member.kind == "symlink":
            if not member.name:
                raise UnsafeArchive("a symlink in place of the top directory")
            self.symlinks.add(member.name)
        else:
            # GNU tar replaces a symlink by the member of that name (it unlinks first)
            self.symlinks.discard(member.name)
        if not member.name and member.kind != "directory":
            raise UnsafeArchive(f"a {member.kind} in place of the top directory")
        self.members += 1


def parse_member(line: str) -> Member | None:
    """A listing line → :class:`Member`, or None when it is not a member line."""
    match = _MEMBER.match(line)
    if match is None:
        return None
    letter = match["type"]
    kind = MEMBER_TYPES.get(letter)
    if kind is None:
        raise UnsafeArchive(f"member of an unsupported type {letter!r}: {line!r}")
    rest = match["rest"]
    raw, end = unquote_c(rest, 0)
    name = components(raw, "member")
    trailer = rest[end:]
    link: tuple[bytes, ...] | None = None
    if kind == "symlink":
        if not trailer.startswith(" -> "):
            raise UnsafeArchive(f"symlink without a target: {line!r}")
        _, end2 = unquote_c(trailer, 4)
        trailer = trailer[end2:]
    elif kind == "hardlink":
        if not trailer.startswith(" link to "):
            raise UnsafeArchive(f"hard link without a target: {line!r}")
        raw_link, end2 = unquote_c(trailer, 9)
        link = components(raw_link, f"hard link {_show(name)!r} to")
        trailer = trailer[end2:]
    if trailer:
        raise UnsafeArchive(f"unexpected text after a member name: {line!r}")
    return Member(kind=kind, name=name, link=link)


def check_record_line(line: str) -> None:
    """Check a listing line that is not a member: an incremental record or a piece of one.

    GNU tar prints the names in a directory's incremental record (``Y``/``N``/``D``
    entries, ``R``/``T`` renames, ``X`` stubs) unquoted, so a name with a newline
    arrives as several lines. Renames are what could reach outside the directory,
    and a ``..`` component or a leading ``/`` survives any split: every such line,
    or piece of one, must be free of both.
    """
    entry = _DUMPDIR.match(line)
    text = entry["name"] if entry else line
    if text.startswith("/") or ".." in text.split("/"):
        what = f"incremental record {entry['code']}" if entry else "incremental record"
        raise UnsafeArchive(f"{what} {text!r} names a path outside the directory")


def scan_listing(lines: Iterable[str], state: ScanState) -> ScanState:
    """Check every line of ``tar -tvv --quoting-style=c -g /dev/null`` output.

    Lines are latin-1 decoded (one character per byte). Raises
    :class:`UnsafeArchive` at the first refused line.
    """
    for line in lines:
        if not line:
            state.in_record = False  # the end of a directory's incremental record
            continue
        member = parse_member(line)
        if member is not None:
            state.add(member)
            state.in_record = member.kind == "directory"
        elif state.in_record and not _MEMBER_START.match(line):
            check_record_line(line)
        else:
            # a line that is neither a member snapcore can read nor part of a record
            # (e.g. a date GNU tar printed as one token): a refusal, never a pass
            raise UnsafeArchive(f"a listing line snapcore cannot read: {line[:200]!r}")
    return state


def check_stderr(text: str) -> None:
    """GNU tar's own warnings that mean a name was rewritten: refuse the archive."""
    for line in text.splitlines():
        if "Removing leading" in line or "contains '..'" in line or "Member name contains" in line:
            raise UnsafeArchive(f"GNU tar had to rewrite names: {line.strip()}")


def scan(archive: Path, read_flags: Sequence[str], state: ScanState) -> int:
    """Read ``archive`` to the end with GNU tar (``read_flags``: its decompression)
    and check every member; returns the number of members. Raises
    :class:`UnsafeArchive` or :class:`BackendError`."""
    before = state.members
    out = LineCounter(None, keep=True)
    argv = [
        tool("tar", TAR),
        "--list",
        "-vv",
        "--numeric-owner",
        "--quoting-style=c",
        "--listed-incremental=/dev/null",
        f"--file={archive}",
        *read_flags,
    ]
    try:
        result = run(argv, target=None, backend=TAR, what=f"reading {archive}", on_out=out)
    except BackendError as exc:
        cause = exc.__cause__
        stderr = getattr(cause, "stderr", b"") or b""
        check_stderr(stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else str(stderr))
        raise
    # our own reading first (it names the member), then GNU tar's warnings: it shows
    # hard-link targets already stripped of a leading "/" and says so only there
    scan_listing(out.text().split("\n"), state)
    check_stderr(result.stderr)
    return state.members - before
