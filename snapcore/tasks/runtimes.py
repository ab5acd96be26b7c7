"""Container runtimes (runc, podman): a container named by the runtime's own id,
the runtime's checkpoint command for it, and the container's init process.

``snapcore checkpoint --container runc:ID -- runc --root R checkpoint --image-path I ID``
runs the runtime's own command line (or, without one, the runtime's plain
``checkpoint ID``); what comes before the word ``checkpoint`` is the runtime with its
global options, used as they are to ask the runtime for the container's state.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

from snapcore.errors import SnapcoreError, UsageError
from snapcore.host.tools import stderr_tail

#: The runtimes, and the words of their checkpoint command. Not crun: Debian 12's
#: crun 1.8.1 is built without CRIU (no ``checkpoint`` command).
RUNTIMES: dict[str, tuple[str, ...]] = {
    "runc": ("checkpoint",),
    "podman": ("container", "checkpoint"),
}
#: How long the runtime may take to say what state the container is in.
STATE_TIMEOUT_S = 30.0
#: Bytes of the runtime's answer read (a state record is well under a kilobyte).
STATE_LIMIT = 1 << 20


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """A container as its runtime names it: ``runc:ID``."""

    runtime: str
    id: str

    @classmethod
    def parse(cls, text: str) -> ContainerRef:
        runtime, sep, cid = text.partition(":")
        if not sep or runtime not in RUNTIMES or not cid or cid.startswith("-") or any(c.isspace() for c in cid):
            raise UsageError(
                f"--container {text!r}: give RUNTIME:ID, RUNTIME one of {', '.join(RUNTIMES)} (e.g. runc:web1)"
            )
        return cls(runtime, cid)

    def __str__(self) -> str:
        return f"{self.runtime}:{self.id}"


def checkpoint_command(ref: ContainerRef, command: list[str] | None) -> list[str]:
    """The runtime's checkpoint command line: ``command`` as given (it must be this
    runtime's checkpoint of this container), else the runtime's plain one."""
    words = RUNTIMES[ref.runtime]
    if not command:
        return [ref.runtime, *words, ref.id]
    program = os.path.basename(command[0])
    at = _index_of(command, words)
    if ref.runtime not in program or at is None or ref.id not in command[at + len(words) :]:
        raise UsageError(
            f"the command after '--' must be {ref.runtime}'s checkpoint of {ref.id}: "
            f"{ref.runtime} [GLOBAL OPTIONS] {' '.join(words)} [OPTIONS] {ref.id} (got: {' '.join(command)[:200]})"
        )
    return command


def _index_of(command: list[str], words: tuple[str, ...]) -> int | None:
    for i in range(1, len(command) - len(words) + 1):
        if tuple(command[i : i + len(words)]) == words:
            return i
    return None


def container_pid(ref: ContainerRef, command: list[str], env: dict[str, str] | None = None) -> int:
    """The container's init process, as the runtime (with the global options in
    ``command``) reports it; raises :class:`SnapcoreError` unless it is running."""
    words = RUNTIMES[ref.runtime]
    at = _index_of(command, words)
    runtime = command[: at if at is not None else 1]
    if ref.runtime == "podman":
        argv = [*runtime, "container", "inspect", "--format", "{{.State.Status}} {{.State.Pid}}", ref.id]
    else:
        argv = [*runtime, "state", ref.id]
    try:
        done = subprocess.run(
            argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=STATE_TIMEOUT_S, check=False, env=env
        )
    except FileNotFoundError:
        raise SnapcoreError(f"{argv[0]}: not found (install {ref.runtime})") from None
    except subprocess.TimeoutExpired:
        raise SnapcoreError(f"{' '.join(argv)}: no answer within {STATE_TIMEOUT_S:.0f}s") from None
    said = done.stderr.decode(errors="replace")
    if done.returncode != 0:
        raise SnapcoreError(f"container {ref}: {stderr_tail(said, 3) or f'{argv[0]} exited {done.returncode}'}")
    status, pid = _status_and_pid(ref, done.stdout[:STATE_LIMIT].decode(errors="replace"))
    if status != "running" or pid <= 0:
        raise SnapcoreError(f"container {ref} is {status or 'not running'}: only a running container is checkpointed")
    return pid


def _status_and_pid(ref: ContainerRef, text: str) -> tuple[str, int]:
    """The runtime's answer, untrusted: a status word and a positive pid, else an error."""
    try:
        if ref.runtime == "podman":
            status, pid_text = text.split()
            pid = int(pid_text)
        else:
            state = json.loads(text)
            status, pid = state["status"], state["pid"]
        if not isinstance(status, str) or not isinstance(pid, int) or isinstance(pid, bool):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise SnapcoreError(
            f"container {ref}: {ref.runtime}'s state is not what snapcore reads: {text[:200]!r}"
        ) from None
    return status, pid
