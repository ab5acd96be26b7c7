r"""The file list of an ``rsync`` tree, and checking a tree against it.

``<slug>.files`` beside a tree lists what rsync put in it, one ``TYPE SIZE NAME``
line per entry as rsync's ``%i %l %n`` gives them (``f`` file, ``d`` directory,
``L`` symlink, ``D`` device, ``S`` special; a size for files only; names escaped
as rsync escapes them, ``\#ooo`` for a non-printable byte). It is made while a
remote tree is copied (:class:`ItemCounter` reads rsync's ``--out-format``
lines) or by walking a local tree after the thaw (:func:`walk_tree`); ``verify``
compares it with what the tree holds now (:func:`scan_local`, :func:`scan_remote`,
:func:`compare`).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from snapcore_tar.progress import Progress
from snapcore_tar.rsync_dest import RsyncOptions, rsync

_ITEM = re.compile(r"^\+ (?P<item>.{11}) (?P<size>\d+) (?P<name>.*)$")  # unchanged items are padded with spaces
_LIST = re.compile(r"^(?P<mode>\S{10}) +(?P<size>[\d,]+) \S+ \S+ (?P<name>.*)$")
_TYPE_OF_MODE = {"-": "f", "d": "d", "l": "L", "c": "D", "b": "D", "p": "S", "s": "S"}


class ItemCounter:
    """Reads rsync's ``--out-format`` lines: the file list, and progress."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.entries: list[str] = []
        self.bytes = 0
        self._pending = ""

    def __call__(self, chunk: str) -> None:
        data = self._pending + chunk
        lines = data.split("\n")
        self._pending = lines.pop()
        nbytes = 0
        files = 0
        for line in lines:
            m = _ITEM.match(line)
            if m is None:
                continue
            item = m["item"]
            if item.startswith("*"):
                continue  # "*deleting": nothing is deleted from a fresh tree
            size = int(m["size"])
            kind = item[1]
            self.entries.append(f"{kind} {size if kind == 'f' else 0} {m['name']}")
            if kind == "f":
                nbytes += size
            files += 1
        self.bytes += nbytes
        self.progress.add(nbytes=nbytes, files=files)


def escape(raw: bytes) -> str:
    r"""A name as rsync prints it: ``\#ooo`` for non-printable bytes (C locale)."""
    out: list[str] = []
    for i, byte in enumerate(raw):
        if byte < 0x20 or byte >= 0x7F or (byte == 0x5C and raw[i + 1 : i + 2] == b"#"):
            out.append(f"\\#{byte:03o}")
        else:
            out.append(chr(byte))
    return "".join(out)


def walk_tree(tree: Path) -> tuple[list[str], int]:
    """The file list of a local tree (``TYPE SIZE NAME``, as rsync's ``%i %l %n``) and its bytes."""
    entries = ["d 0 ./"]
    nbytes = 0
    root = os.fsencode(tree)
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for entry in it:
                path = os.path.join(rel, entry.name) if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                kind = _kind_of(st.st_mode)
                if kind == "d":
                    entries.append(f"d 0 {escape(path)}/")
                    stack.append(path)
                elif kind == "f":
                    entries.append(f"f {st.st_size} {escape(path)}")
                    nbytes += st.st_size
                else:
                    entries.append(f"{kind} 0 {escape(path)}")
    return entries, nbytes


def unescape(name: str) -> bytes:
    r"""rsync's ``\#ooo`` escapes (non-printable bytes in its output) → raw bytes."""
    raw = name.encode("latin-1")
    if b"\\#" not in raw:
        return raw
    return re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), raw)


def parse_file_list(text: str) -> list[tuple[str, int, str]]:
    entries = []
    for line in text.splitlines():
        if not line:
            continue
        kind, size, name = line.split(" ", 2)
        entries.append((kind, int(size), name))
    return entries


def _kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "L"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "D"
    return "S"


def compare(entries: list[tuple[str, int, str]], found: Mapping[bytes, tuple[str, int]]) -> list[str]:
    problems: list[str] = []
    for kind, size, name in entries:
        key = unescape(name).rstrip(b"/") or b"."
        got = found.get(key)
        shown = name.rstrip("/") or "."
        if got is None:
            problems.append(f"{shown}: missing from the tree")
        elif got[0] != kind:
            problems.append(f"{shown}: is a {got[0]!r}, recorded as {kind!r}")
        elif kind == "f" and got[1] != size:
            problems.append(f"{shown}: {got[1]} bytes, recorded {size}")
    if len(problems) > 20:
        problems = [*problems[:20], f"... and {len(problems) - 20} more"]
    return problems


def scan_local(tree: Path, entries: list[tuple[str, int, str]]) -> dict[bytes, tuple[str, int]]:
    found: dict[bytes, tuple[str, int]] = {}
    root = os.fsencode(tree)
    for _, _, name in entries:
        key = unescape(name).rstrip(b"/") or b"."
        try:
            st = os.lstat(os.path.join(root, key))
        except OSError:
            continue
        found[key] = (_kind_of(st.st_mode), st.st_size)
    return found


def scan_remote(opts: RsyncOptions, url: str) -> dict[bytes, tuple[str, int]]:
    lines: list[str] = []

    def collect(chunk: str) -> None:
        lines.append(chunk)

    rsync(opts, ["--list-only", "-r", "--no-h", url + "/"], target=None, what=f"listing {url}", on_out=collect)
    found: dict[bytes, tuple[str, int]] = {}
    for line in "".join(lines).splitlines():
        m = _LIST.match(line)
        if m is None:
            continue
        kind = _TYPE_OF_MODE.get(m["mode"][0], "S")
        name = m["name"]
        size = int(m["size"].replace(",", ""))
        if kind == "L" and " -> " in name:
            # "name -> target" (an rsync daemon shows targets; over ssh rsync shows the
            # name alone): every split is a candidate; the file list decides
            parts = name.split(" -> ")
            for i in range(1, len(parts)):
                found[unescape(" -> ".join(parts[:i]))] = (kind, size)
            continue
        found[unescape(name).rstrip(b"/") or b"."] = (kind, size)
    return found
