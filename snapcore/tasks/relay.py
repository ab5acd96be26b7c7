"""The action-script relay: CRIU's post-dump handed to a snapcore process that is
already running, so that the tasks CRIU holds stopped wait for the checkpoint
itself, not for Python to start and load (~0.15 s of a 0.2 s hook).

``snapcore checkpoint --container`` makes a :class:`Relay`: a private directory
holding two FIFOs, a sh action script and a CRIU config file naming it, which the
runtime's CRIU reads through ``CRIU_CONFIG_FILE`` (CRIU reads that file in the RPC
mode runtimes use too, beside the runtime's own; for runtimes that clear the
environment, as podman does, the ``criu`` first on ``PATH`` is a shim that sets it).
The script returns at once for
every action but post-dump; at post-dump it writes one request line into ``req``
and waits, bounded by ``timeout``, for the answer line in ``rep``:

* ``ok ID``: the checkpoint is made, CRIU goes on;
* ``error MESSAGE`` or no answer in time (the snapcore process died): the script
  exits 1, so CRIU fails the dump and resumes the tasks.

The relay holds both FIFOs open for reading and writing, so neither side ever
blocks opening them, and the script's wait ends at once with an empty answer if
the relay's process dies while it waits.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from snapcore.errors import SnapcoreError

#: Set in the runtime's environment (so in CRIU's and the action scripts'): the pid of
#: the snapcore process relaying post-dump; ``snapcore criu-hook`` named in the
#: container's own CRIU config then leaves the dump to it.
RELAY_ENV = "SNAPCORE_RELAY"
#: Bytes of the caller's own ``CRIU_CONFIG_FILE`` carried into the relay's.
USER_CONFIG_LIMIT = 64 << 10
#: Bytes of one request line.
REQUEST_LIMIT = 4096
_IMAGES_DIR = re.compile(r"(/proc/[0-9]+/fd/[0-9]+|/[^\n\x00]*)")

SCRIPT = """#!/bin/sh
# CRIU action script written by snapcore (pid {pid}) for one checkpoint: it hands
# post-dump to that process and waits for its answer; every other action returns at once.
[ "$CRTOOLS_SCRIPT_ACTION" = post-dump ] || exit 0
printf 'post-dump %s %s\\n' "${{CRTOOLS_INIT_PID:-0}}" "${{CRTOOLS_IMAGE_DIR:--}}" 1<>{req} || exit 1
reply=$({timeout} {seconds} {head} -n 1 {rep})
case "$reply" in
"ok "*) echo "snapcore: checkpoint ${{reply#ok }} of the dumped tasks' filesystems" >&2; exit 0 ;;
"error "*) echo "snapcore criu-hook (post-dump): ${{reply#error }}" >&2; exit 1 ;;
esac
echo "snapcore criu-hook (post-dump): no answer from snapcore (pid {pid}) within {seconds}s" >&2
exit 1
"""


#: ``criu`` first on the runtime's ``PATH``: podman hands runc (and so CRIU) an
#: environment of ``PATH`` and ``XDG_RUNTIME_DIR`` alone, but runc runs the ``criu`` it
#: finds on that ``PATH``.
SHIM = """#!/bin/sh
# 'criu' for the runtime snapcore (pid {pid}) runs: the real one, told of snapcore's relay
CRIU_CONFIG_FILE={config} {env}={pid}
export CRIU_CONFIG_FILE {env}
exec {criu} "$@"
"""


@dataclass(frozen=True, slots=True)
class Request:
    """One post-dump, as the script reports it (untrusted: checked by :func:`parse`)."""

    action: str
    init_pid: int
    images_dir: str


def parse(line: bytes) -> Request | None:
    """A request line, or None when it is not one."""
    try:
        action, pid, images_dir = line.decode("utf-8").rstrip("\n").split(" ", 2)
    except (UnicodeDecodeError, ValueError):
        return None
    if action != "post-dump" or not pid.isdigit() or int(pid) <= 1 or not _IMAGES_DIR.fullmatch(images_dir):
        return None
    return Request(action, int(pid), images_dir)


class Relay:
    """The relay's directory, FIFOs, script and CRIU config; :meth:`serve` answers
    post-dump while the runtime runs. Use it as a context manager."""

    def __init__(
        self, parent: Path, *, timeout_s: float, user_config: str | None = None, criu: str | None = None
    ) -> None:
        #: ``parent/PID-XXXX``, made on entering
        self.dir = parent
        self.timeout_s = max(1, int(timeout_s + 0.999))
        self.script = parent / "action-script"
        self.config = parent / "criu.conf"
        self._req = self._rep = -1
        self._buffer = b""
        self._user_config = user_config
        self._criu = criu
        self._made = False

    def __enter__(self) -> Relay:
        from snapcore.host.fsutil import secure_dir
        from snapcore.host.tools import write_atomic

        secure_dir(self.dir)
        _forget_dead_relays(self.dir)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.dir))
        self._made = True
        self.script = self.dir / "action-script"
        self.config = self.dir / "criu.conf"
        try:
            for name in ("req", "rep"):
                os.mkfifo(self.dir / name, 0o600)
            flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
            self._req = os.open(self.dir / "req", flags)
            self._rep = os.open(self.dir / "rep", flags)
            tools = {name: shutil.which(name) or f"/usr/bin/{name}" for name in ("timeout", "head")}
            text = SCRIPT.format(
                pid=os.getpid(),
                req=shlex.quote(str(self.dir / "req")),
                rep=shlex.quote(str(self.dir / "rep")),
                seconds=self.timeout_s,
                **{name: shlex.quote(path) for name, path in tools.items()},
            )
            write_atomic(self.script, text.encode(), mode=0o700, sync=False)
            write_atomic(self.config, self._config_text().encode(), mode=0o600, sync=False)
            if self._criu:
                shim = SHIM.format(
                    pid=os.getpid(), config=shlex.quote(str(self.config)), criu=shlex.quote(self._criu), env=RELAY_ENV
                )
                (self.dir / "bin").mkdir(mode=0o700)
                write_atomic(self.dir / "bin" / "criu", shim.encode(), mode=0o700, sync=False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _config_text(self) -> str:
        """The caller's own ``CRIU_CONFIG_FILE`` (CRIU reads one such file), then ours."""
        carried = ""
        if self._user_config:
            from snapcore.host.fsutil import read_regular

            try:
                carried = read_regular(Path(self._user_config), USER_CONFIG_LIMIT).decode("utf-8", "replace")
            except OSError as exc:
                raise SnapcoreError(f"CRIU_CONFIG_FILE={self._user_config}: {exc.strerror or exc}") from None
            carried = carried.rstrip("\n") + "\n"
        return f"{carried}# snapcore: hand post-dump to the running snapcore checkpoint\naction-script {self.script}\n"

    def env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The runtime's environment: CRIU reads our config, the hook knows of us, and
        ``criu`` on ``PATH`` is our shim (for runtimes that pass CRIU ``PATH`` alone)."""
        env = {**base, "CRIU_CONFIG_FILE": str(self.config), RELAY_ENV: str(os.getpid())}
        if self._criu:
            env["PATH"] = f"{self.dir / 'bin'}:{base.get('PATH', os.defpath)}"
        return env

    def serve(self, runtime: subprocess.Popen[bytes], handle: Callable[[Request], str]) -> int:
        """Answer requests until ``runtime`` exits; its exit status. ``handle`` returns
        the answer line (``ok ID`` or ``error MESSAGE``) for one request."""
        pidfd = os.pidfd_open(runtime.pid)
        try:
            poller = select.poll()
            poller.register(self._req, select.POLLIN)
            poller.register(pidfd, select.POLLIN)
            while True:
                events = dict(poller.poll())
                if self._req in events:
                    self._answer_all(handle)
                if pidfd in events:
                    break
        finally:
            os.close(pidfd)
        self._answer_all(handle)  # what the script wrote just before the runtime ended, too
        return runtime.wait()

    def _answer_all(self, handle: Callable[[Request], str]) -> None:
        for request in self._requests():
            self.answer(handle(request) if request is not None else "error a request snapcore cannot read")

    def _requests(self) -> list[Request | None]:
        while True:
            try:
                chunk = os.read(self._req, REQUEST_LIMIT)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > REQUEST_LIMIT:
            self._buffer, lines = b"", [*lines, b""]
        return [parse(line) for line in lines]

    def answer(self, reply: str) -> None:
        line = " ".join(reply.split())[: REQUEST_LIMIT - 1] + "\n"
        with contextlib.suppress(BlockingIOError):  # 64 KiB of unread answers: nobody is listening
            os.write(self._rep, line.encode())

    def close(self) -> None:
        for fd in (self._req, self._rep):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._req = self._rep = -1
        if self._made:
            self._made = False
            shutil.rmtree(self.dir, ignore_errors=True)


def _forget_dead_relays(parent: Path) -> None:
    """Relay directories left by snapcore processes that are gone."""
    for entry in parent.iterdir():
        pid = entry.name.partition("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(entry, ignore_errors=True)
