"""The exceptions snapcore raises on purpose.

The CLI catches :class:`SnapcoreError` once, prints its message on one line and
exits with its ``exit_code``; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the ``snapcore`` command (a contract with users' scripts)."""

    OK = 0
    FAILED = 1
    USAGE = 2


class SnapcoreError(Exception):
    """Base class: a mistake of the user's or a failure of the host, never a bug."""

    exit_code: ExitCode = ExitCode.FAILED


class UsageError(SnapcoreError):
    """Bad command-line usage: a missing file, a path that does not exist, not root."""

    exit_code = ExitCode.USAGE


class PolicyError(SnapcoreError):
    """A policy that cannot be used; the message names file, line, mount and key."""

    exit_code = ExitCode.USAGE

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        mount: str | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.mount = mount
        self.key = key
        self.problem = message
        where = []
        if file is not None:
            where.append(f"{file}:{line}" if line is not None else file)
        if mount is not None:
            where.append(f"mount {mount}")
        if key is not None:
            where.append(f"key {key!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class PluginError(SnapcoreError):
    """A backend plugin that is missing, broken or in conflict with another."""

    exit_code = ExitCode.USAGE


class UnsupportedMount(SnapcoreError):
    """No usable backend for a required target, or a path that is no real filesystem."""

    exit_code = ExitCode.USAGE


class BackendError(SnapcoreError):
    """A backend failed while working on a mount."""

    def __init__(self, message: str, *, mount: str | None = None, backend: str | None = None) -> None:
        self.mount = mount
        self.backend = backend
        prefix = ", ".join(p for p in (backend and f"{backend}", mount) if p)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class MissingTool(BackendError):
    """A command a backend needs is not installed; the message names the package."""

    def __init__(self, tool: str, package: str, *, backend: str | None = None) -> None:
        self.tool = tool
        self.package = package
        super().__init__(
            f"{tool!r} is not installed: install the Debian package {package!r} (apt-get install {package})",
            backend=backend,
        )


class FrozenElsewhere(BackendError):
    """The filesystem is already frozen by someone else (FIFREEZE answered EBUSY)."""


class StillNeeded(BackendError):
    """A backend refused to discard an image or export that later ones build on (an
    incremental chain's base): ``prune`` keeps it, ``delete`` says to remove those first."""


class MountBusy(BackendError):
    """An in-place restore cannot switch what the mount shows now: processes (or
    mounts stacked on it) hold it. Nothing was changed, and a command given after
    ``--`` is not run: it would start on the old tree."""

    def __init__(self, mount: str, holders: Sequence[object], *, backend: str | None = None, done: str = "") -> None:
        self.holders = tuple(holders)
        shown = ", ".join(str(h) for h in self.holders[:8])
        if len(self.holders) > 8:
            shown += f" and {len(self.holders) - 8} more"
        super().__init__(
            f"cannot restore in place now: {mount} is in use by {shown}; {done or 'nothing was changed'}. "
            "Stop them (or let their own checkpoint end them), then restore again; or restore a copy "
            "with --to DIR",
            mount=mount,
            backend=backend,
        )


class ToolFailed(BackendError):
    """A tool a backend ran failed (:func:`snapcore.run_tool`); ``argv``, ``stderr``
    and ``status`` are kept, the message has the command and its stderr's last lines."""

    def __init__(
        self,
        argv: Sequence[str],
        stderr: str,
        *,
        mount: str | None = None,
        backend: str | None = None,
        status: int | None = None,
    ) -> None:
        from snapcore.host.tools import stderr_tail

        self.argv = list(argv)
        self.stderr = stderr
        self.status = status
        how = f" (exit {status})" if status is not None else ""
        super().__init__(
            f"'{' '.join(self.argv)}' failed{how}: {stderr_tail(stderr) or 'no message'}", mount=mount, backend=backend
        )


class ThawError(BackendError):
    """A thaw failed: the filesystem may still be frozen, which is an outage."""


class DeadlineExceeded(SnapcoreError):
    """The freeze window outlived its ``freeze_timeout``; everything was thawed."""


class Cancelled(SnapcoreError):
    """The checkpoint was cancelled (SIGTERM, SIGINT, or ``Cancel.set``): it failed
    like on any error: everything thawed, what it made discarded."""


class ChangeDetected(SnapcoreError):
    """A file the tasks need changed between their freeze and thaw (``on_change: fail``)."""


class PayloadFailed(SnapcoreError):
    """The caller's command (``-- CMD``) failed; its status decides the outcome."""


class CheckpointFailed(SnapcoreError):
    """A checkpoint failed; ``manifest`` says what failed (it was written)."""

    def __init__(self, message: str, manifest: object | None = None) -> None:
        self.manifest = manifest
        super().__init__(message)


class Untrusted(SnapcoreError):
    """A name from a manifest, record or listing that could lead outside its place."""


class LockBusy(SnapcoreError):
    """Another checkpoint holds the mount; the message names it."""


class CriuError(SnapcoreError):
    """CRIU failed; the message has the command, its exit status and its log tail."""

    def __init__(self, message: str, *, command: Sequence[str] = (), log_file: str | None = None) -> None:
        self.command = tuple(command)
        self.log_file = log_file
        super().__init__(message)


class CriuUnavailable(CriuError):
    """No usable CRIU on this host (missing, too old, or ``criu check`` fails)."""


class TaskError(SnapcoreError):
    """Tasks could not be frozen or thawed (a task in ``D`` state, a cgroup that
    refused the move...). Everything this module froze was thawed before raising."""


class NoSuchTask(UsageError):
    """A PID that does not exist, is a zombie, or exited while being resolved."""


class NotACgroup(UsageError):
    """A ``--cgroup`` path that is no cgroup directory (v2 or v1 freezer)."""


class PolicyProblems(PolicyError):
    """Several problems in one policy; ``str()`` is the first, ``problems`` all."""

    def __init__(self, problems: Sequence[PolicyError]) -> None:
        self.problems = list(problems)
        first = self.problems[0]
        more = (
            f" (and {len(self.problems) - 1} more problem(s); run 'snapcore policy check')"
            if len(self.problems) > 1
            else ""
        )
        super().__init__(first.problem + more, file=first.file, line=first.line, mount=first.mount, key=first.key)


class GuardError(SnapcoreError):
    """The guard process could not be started or reached: nothing is frozen without it."""
