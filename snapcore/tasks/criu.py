"""CRIU: find it, check it, run dump and restore, and serve its action scripts.

Which CRIU: ``$CRIU`` when set, else ``/usr/local/sbin/criu`` (what
``scripts/setup-criu.sh`` builds: Debian 12's own ``criu`` 3.17 fails on recent
kernels), else ``criu`` on ``PATH``. :func:`check_criu` runs ``criu check`` and,
when it fails, says why and what to do.

CRIU is judged by its exit status, never by grepping its log: every log here has a
harmless ``Error … rlimit: Can't setup RLIMIT_NOFILE`` line.

Action scripts: ``criu dump --action-script 'snapcore criu-hook'`` runs the hook
with ``CRTOOLS_SCRIPT_ACTION`` set (``post-dump`` while the tasks are still
stopped, ``pre-restore`` before CRIU opens any file...). :func:`handle_action`
maps such an environment to a handler; a non-zero exit aborts the dump and resumes
the tasks.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from snapcore.errors import CriuError, CriuUnavailable, SnapcoreError
from snapcore.host.tools import stderr_tail

log = logging.getLogger(__name__)

#: Environment variable naming the CRIU binary.
CRIU_ENV = "CRIU"
#: Where ``scripts/setup-criu.sh`` installs CRIU.
LOCAL_CRIU = "/usr/local/sbin/criu"
MIN_VERSION = (4, 1)


def find_criu(env: Mapping[str, str] | None = None) -> str:
    """The CRIU binary to use (``$CRIU``, ``/usr/local/sbin/criu``, ``criu`` on PATH).

    Raises:
        CriuUnavailable: none found, or ``$CRIU`` names nothing executable.
    """
    env = os.environ if env is None else env
    wanted = env.get(CRIU_ENV)
    if wanted:
        found = shutil.which(wanted)
        if found is None:
            raise CriuUnavailable(f"{CRIU_ENV}={wanted}: no such executable")
        return found
    if os.access(LOCAL_CRIU, os.X_OK):
        return LOCAL_CRIU
    found = shutil.which("criu", path=env.get("PATH", os.defpath))
    if found is None:
        raise CriuUnavailable(
            "CRIU is not installed: run scripts/setup-criu.sh (builds CRIU >= 4.2 into /usr/local/sbin/criu) "
            f"or set {CRIU_ENV}=/path/to/criu"
        )
    return found


def _sh(path: str, *args: str, **kwargs: Any) -> Any:
    """Run ``path args`` with the ``sh`` library: no tty, output captured."""
    import sh  # lazily: the CLI must start fast

    return sh.Command(path)(*args, _tty_out=False, **kwargs)


def _tail(text: str | bytes, lines: int = 8) -> str:
    """CRIU's output, as every tool's is reported, less its RLIMIT_NOFILE chatter."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return stderr_tail("\n".join(line for line in text.splitlines() if "RLIMIT_NOFILE" not in line), lines)


def log_path(argv: Sequence[str]) -> str | None:
    """Where a ``criu`` command line writes its log: ``-o``/``--log-file``, relative
    to ``-W``/``--work-dir``, else to ``-D``/``--images-dir``, else to the current
    directory. None when it logs to stderr (no log file named)."""
    opts: dict[str, str] = {}
    names = {
        "-o": "log",
        "--log-file": "log",
        "-W": "work",
        "--work-dir": "work",
        "-D": "images",
        "--images-dir": "images",
    }
    for i, arg in enumerate(argv):
        if arg in names and i + 1 < len(argv):
            opts[names[arg]] = argv[i + 1]
        elif "=" in arg and arg.split("=", 1)[0] in names:
            key, value = arg.split("=", 1)
            opts[names[key]] = value
    log = opts.get("log")
    if not log or log == "-":
        return None
    return os.path.join(opts.get("work") or opts.get("images") or ".", log)


def log_errors(argv: Sequence[str], limit: int = 5) -> list[str]:
    """The reasons CRIU gave, in its words: the ``Error`` lines of the log the command
    line ``argv`` wrote (timestamps and source locations cut, the harmless
    ``RLIMIT_NOFILE`` line left out), the first ``limit`` of them: the first is
    usually the cause, the later ones its consequences."""
    path = log_path(argv)
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (4 << 20)))  # the end of a huge log is enough
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        m = _ERROR_LINE.search(line)
        if m is None or "RLIMIT_NOFILE" in line:
            continue
        message = m.group(1).strip()
        if message and message not in found:
            found.append(message)
        if len(found) >= limit:
            break
    return found


_LOG_OPTIONS = {
    **dict.fromkeys(("-o", "--log-file"), "log"),
    **dict.fromkeys(("-W", "--work-dir"), "work"),
    **dict.fromkeys(("-D", "--images-dir"), "images"),
}
_ERROR_LINE = re.compile(r"\bError \([^)]*\):\s*(.*)$")


def describe_failure(argv: Sequence[str], status: int) -> str:
    """``command '...' exited with status N``, with CRIU's own reasons when ``argv``
    runs criu and named a log file."""
    message = f"command {' '.join(argv)!r} exited with status {status}"
    if not argv or os.path.basename(argv[0]) != "criu":
        return message
    errors = log_errors(argv)
    path = log_path(argv)
    if errors:
        message += f"; CRIU says: {' | '.join(errors)}"
    if path is not None:
        message += f" (log: {os.path.abspath(path)})"
    return message


def parse_version(text: str) -> tuple[int, ...]:
    """``"Version: 4.1.1\\n"`` → ``(4, 1, 1)``; ``()`` when there is no version line."""
    for line in text.splitlines():
        if line.startswith("Version:"):
            parts = []
            for piece in line.split(":", 1)[1].strip().split("."):
                digits = "".join(ch for ch in piece if ch.isdigit())
                if not digits:
                    break
                parts.append(int(digits))
            return tuple(parts)
    return ()


@dataclass(frozen=True, slots=True, kw_only=True)
class CriuRun:
    """One CRIU run: what ran, where its log is, how long it took."""

    command: tuple[str, ...]
    images_dir: str
    log_file: str
    elapsed_ms: float
    #: The restored root's PID (restore with a pidfile), else None.
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "command": list(self.command),
            "images_dir": self.images_dir,
            "log_file": self.log_file,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "pid": self.pid,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Criu:
    """A checked CRIU binary (from :func:`check_criu`)."""

    path: str
    version: tuple[int, ...]

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))

    def _run(self, action: str, args: Sequence[str], images_dir: str, log_name: str) -> CriuRun:
        command = (self.path, action, *args)
        log_file = os.path.join(images_dir, log_name)
        import sh

        t0 = time.perf_counter()
        try:
            _sh(self.path, action, *args)
        except sh.ErrorReturnCode as exc:
            try:
                tail = _tail(Path(log_file).read_text(errors="replace"))
            except OSError:
                tail = _tail(exc.stderr)
            raise CriuError(
                f"criu {action} failed (exit {exc.exit_code}): {tail or 'no log'}; log: {log_file}",
                command=command,
                log_file=log_file,
            ) from exc
        except sh.SignalException as exc:
            raise CriuError(f"criu {action} was killed ({exc}); log: {log_file}", command=command) from exc
        return CriuRun(
            command=command, images_dir=images_dir, log_file=log_file, elapsed_ms=(time.perf_counter() - t0) * 1000
        )

    def dump(
        self,
        pid: int,
        images_dir: str | os.PathLike[str],
        *,
        freeze_cgroup: str | None = None,
        leave_running: bool = False,
        shell_job: bool = False,
        action_script: str | None = None,
        extra: Sequence[str] = (),
        log_name: str = "dump.log",
    ) -> CriuRun:
        """``criu dump -t PID -D DIR``.

        Args:
            freeze_cgroup: the cgroup the tasks are frozen in (from
                :attr:`snapcore.tasks.freezer.TaskFreezer.criu_freeze_cgroup`): required when
                snapcore froze them, or CRIU waits forever for them to stop.
            leave_running: keep the tasks running after the dump (``-R``).
            shell_job: the tree does not lead its session (``--shell-job``).
            action_script: ``--action-script`` (e.g. ``snapcore criu-hook``).
            extra: more CRIU options, verbatim.

        Raises:
            CriuError: CRIU failed; the message has its log tail.
        """
        directory = os.fspath(images_dir)
        os.makedirs(directory, exist_ok=True)
        args = ["-t", str(pid), "-D", directory, "-o", log_name, "-v4"]
        if freeze_cgroup:
            args += ["--freeze-cgroup", freeze_cgroup]
        if leave_running:
            args.append("--leave-running")
        if shell_job:
            args.append("--shell-job")
        if action_script:
            args += ["--action-script", action_script]
        return self._run("dump", [*args, *extra], directory, log_name)

    def restore(
        self,
        images_dir: str | os.PathLike[str],
        *,
        detach: bool = True,
        shell_job: bool = False,
        manage_cgroups: str | None = "ignore",
        action_script: str | None = None,
        extra: Sequence[str] = (),
        log_name: str = "restore.log",
    ) -> CriuRun:
        """``criu restore -D DIR`` (detached by default: ``-d``; returns the root PID).

        Args:
            manage_cgroups: ``--manage-cgroups`` mode; ``ignore`` by default because
                a tree snapcore froze was dumped from its temporary cgroup, which
                CRIU would otherwise recreate (and leave behind). None: CRIU's default.

        Raises:
            CriuError: CRIU failed (a PID in use, a file changed since the dump...).
        """
        directory = os.fspath(images_dir)
        pidfile = os.path.join(directory, f"restore-{os.getpid()}.pid")
        args = ["-D", directory, "-o", log_name, "-v4", "--pidfile", pidfile]
        if detach:
            args.append("--restore-detached")
        if shell_job:
            args.append("--shell-job")
        if manage_cgroups:
            args.append(f"--manage-cgroups={manage_cgroups}")
        if action_script:
            args += ["--action-script", action_script]
        run = self._run("restore", [*args, *extra], directory, log_name)
        pid: int | None = None
        try:
            pid = int(Path(pidfile).read_text().strip())
            os.unlink(pidfile)
        except (OSError, ValueError):
            pass
        return CriuRun(
            command=run.command, images_dir=run.images_dir, log_file=run.log_file, elapsed_ms=run.elapsed_ms, pid=pid
        )


def criu_version(path: str) -> tuple[int, ...]:
    import sh

    try:
        out = _sh(path, "--version")
    except (sh.ErrorReturnCode, OSError) as exc:
        raise CriuUnavailable(f"{path} --version failed: {exc}") from exc
    return parse_version(str(out))


def check_criu(path: str | None = None, *, env: Mapping[str, str] | None = None) -> Criu:
    """A CRIU that is new enough and passes ``criu check``; else a plain error.

    Raises:
        CriuUnavailable: with the cause (missing, too old, not root, the kernel
            lacks a feature) and the next step.
    """
    import sh

    path = path or find_criu(env)
    version = criu_version(path)
    if version and version < MIN_VERSION:
        raise CriuUnavailable(
            f"{path} is CRIU {'.'.join(map(str, version))}, older than "
            f"{'.'.join(map(str, MIN_VERSION))}: older releases fail on recent kernels (Debian 12's 3.17: "
            "'vdso: Unexpected rt vDSO area bounds'); run scripts/setup-criu.sh to build a newer one "
            f"into {LOCAL_CRIU}, or set {CRIU_ENV}"
        )
    try:
        _sh(path, "check", _err_to_out=True)
    except sh.ErrorReturnCode as exc:
        output = _tail(exc.stdout, 4)
        if os.geteuid() != 0:
            cause = "CRIU needs root (CAP_SYS_ADMIN, CAP_SYS_PTRACE...); run snapcore as root"
        elif "vdso" in output.lower():
            cause = f"this CRIU is too old for the kernel's vDSO: run scripts/setup-criu.sh or set {CRIU_ENV}"
        else:
            cause = "the kernel lacks a feature CRIU needs (see its message)"
        raise CriuUnavailable(f"'{path} check' failed: {output or 'no output'}. Cause: {cause}") from exc
    return Criu(path=path, version=version)


# -- action scripts ------------------------------------------------------------------


class ScriptAction(StrEnum):
    """Values of ``CRTOOLS_SCRIPT_ACTION`` (CRIU's ``--action-script``)."""

    PRE_DUMP = "pre-dump"
    POST_DUMP = "post-dump"
    PRE_RESTORE = "pre-restore"
    POST_RESTORE = "post-restore"
    PRE_RESUME = "pre-resume"
    POST_RESUME = "post-resume"
    NETWORK_LOCK = "network-lock"
    NETWORK_UNLOCK = "network-unlock"
    SETUP_NAMESPACES = "setup-namespaces"
    POST_SETUP_NAMESPACES = "post-setup-namespaces"
    ORPHAN_PTS_MASTER = "orphan-pts-master"
    QUERY_EXT_FILES = "query-ext-files"
    STATUS_READY = "status-ready"


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionEvent:
    """What CRIU told an action script through its environment."""

    action: str
    images_dir: str | None
    #: ``CRTOOLS_INIT_PID``: the root task (set for some actions only).
    init_pid: int | None

    @property
    def known(self) -> ScriptAction | None:
        try:
            return ScriptAction(self.action)
        except ValueError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "images_dir": self.images_dir, "init_pid": self.init_pid}


def action_from_env(env: Mapping[str, str] | None = None) -> ActionEvent | None:
    """The action CRIU is running this process for; None outside an action script."""
    env = os.environ if env is None else env
    action = env.get("CRTOOLS_SCRIPT_ACTION")
    if not action:
        return None
    pid = env.get("CRTOOLS_INIT_PID")
    images = env.get("CRTOOLS_IMAGE_DIR")
    return ActionEvent(
        action=action,
        images_dir=os.path.realpath(images) if images else None,
        init_pid=int(pid) if pid and pid.isdigit() else None,
    )


ActionHandler = Callable[[ActionEvent], None]


def handle_action(
    handlers: Mapping[str, ActionHandler],
    env: Mapping[str, str] | None = None,
    *,
    stderr: Any = None,
) -> int:
    """Run the handler for the current CRIU action; the exit status for CRIU.

    ``handlers`` maps action names (``"post-dump"``, ``"pre-restore"``...) to
    callables. An action without a handler succeeds (CRIU calls the script for every
    action). A handler raising :class:`SnapcoreError` prints one line on stderr and
    gives 1, which makes CRIU abort (a dump resumes the tasks); other exceptions are
    bugs and propagate. Outside an action script (no ``CRTOOLS_SCRIPT_ACTION``),
    prints a usage line and gives 2.
    """
    stderr = stderr or sys.stderr
    event = action_from_env(env)
    if event is None:
        print("snapcore criu-hook: run by CRIU (--action-script), CRTOOLS_SCRIPT_ACTION is not set", file=stderr)
        return 2
    handler = handlers.get(event.action)
    if handler is None:
        log.debug("CRIU action %s: nothing to do", event.action)
        return 0
    try:
        handler(event)
    except SnapcoreError as exc:
        print(f"snapcore criu-hook ({event.action}): {exc}", file=stderr)
        return 1
    return 0
