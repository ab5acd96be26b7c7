"""Running the tools backends use (``lvcreate``, ``dmsetup``, ``mount``, ``btrfs``,
``tar``...): found on ``PATH`` or named with the package to install, run with the C
locale, their failure reported one way (:class:`~snapcore.errors.ToolFailed`: the
command and the last lines of its stderr, on one line)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from snapcore.errors import MissingTool, ToolFailed

#: Every tool runs with these: its messages and name quoting are the same on every host.
TOOL_LOCALE = {"LC_ALL": "C", "LANG": "C"}


def find_tool(name: str, *, package: str, backend: str | None = None) -> str:
    """Absolute path of ``name`` on ``PATH``, else :class:`MissingTool` naming the
    Debian ``package`` that provides it."""
    import shutil  # here, not at the top: shutil pulls in bz2, lzma and zlib (~4 ms) for every manifest write

    path = shutil.which(name)
    if path is None:
        raise MissingTool(name, package, backend=backend)
    return path


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with :data:`TOOL_LOCALE` (and ``extra``)."""
    env = dict(os.environ)
    env.update(TOOL_LOCALE)
    env.update(extra or {})
    return env


def stderr_tail(text: str | bytes | None, lines: int = 3) -> str:
    """The last non-empty lines of a tool's output, joined on one line (" | ")."""
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    kept = [line.strip() for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def run_tool(
    argv: Sequence[str],
    *,
    backend: str | None = None,
    package: str | None = None,
    mount: str | None = None,
    stdin: str | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run ``argv`` to completion; its stdout. A tool not on ``PATH`` is
    :class:`MissingTool` (naming ``package``, default: the tool's own name); a
    non-zero exit or a ``timeout`` is :class:`ToolFailed`. Plain :mod:`subprocess`:
    the ``sh`` package costs ~25 ms to import (0.7-1.2 s in the test VM), paid by
    every command that touches such a mount."""
    import subprocess

    cmd = [str(a) for a in argv]
    path = find_tool(cmd[0], package=package or os.path.basename(cmd[0]), backend=backend)
    try:
        proc = subprocess.run(
            [path, *cmd[1:]],
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            env=dict(env) if env is not None else tool_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolFailed(cmd, f"timed out after {timeout:g}s", mount=mount, backend=backend) from exc
    except OSError as exc:
        raise ToolFailed(cmd, f"cannot run it: {exc.strerror}", mount=mount, backend=backend) from exc
    if proc.returncode != 0:
        raise ToolFailed(cmd, proc.stderr or proc.stdout, mount=mount, backend=backend, status=proc.returncode)
    return proc.stdout


def write_atomic(path: str | os.PathLike[str], data: bytes, *, sync: bool = True, mode: int = 0o644) -> None:
    """Write ``path`` under a temporary name beside it (created anew, never through a
    link planted there), fsync it, and rename it into place: never half a file.
    ``sync=False`` where the caller syncs the whole filesystem once afterwards."""
    import contextlib

    final = os.fspath(path)
    tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
