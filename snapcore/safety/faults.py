"""Test-only fault injection: make a phase raise, hang, or kill the controller.

``SNAPCORE_FAULT="PHASE[:BACKEND]=ACTION[,...]"`` with PHASE one of ``prepare``,
``precopy``, ``freeze``, ``snapshot``, ``thaw``, ``export``, ``finish``, ``discard`` (backend hooks, optionally
only for one backend), ``manifest`` or ``payload`` (the core's own steps), and ACTION
``raise``, ``hang`` (sleeps an hour) or ``kill`` (SIGKILL to the controller itself).
These are fakes of failures that cannot be caused for real on demand; they exist so
that tests can prove nothing is left frozen or half-made whatever fails where. The
variable is read once per process; without it, ``inject`` costs one dict lookup.

``SNAPCORE_FAULT_REACHED=FILE`` makes every fault append ``PHASE=ACTION`` to FILE
just before it acts, so a test waits until the controller has really reached a
``hang`` (on a slow machine that can take seconds) instead of guessing a time.
"""

from __future__ import annotations

import functools
import os
import time

PHASES = ("prepare", "precopy", "freeze", "snapshot", "thaw", "export", "finish", "discard", "manifest", "payload")
ACTIONS = ("raise", "hang", "kill")


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


@functools.cache
def _faults() -> dict[tuple[str, str | None], str]:
    spec = os.environ.get("SNAPCORE_FAULT", "")
    faults: dict[tuple[str, str | None], str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, _, action = item.partition("=")
        phase, _, backend = where.partition(":")
        if phase not in PHASES or action not in ACTIONS:
            raise ValueError(f"SNAPCORE_FAULT: bad entry {item!r} (phases {PHASES}, actions {ACTIONS})")
        faults[(phase, backend or None)] = action
    return faults


def inject(phase: str, backend: str | None = None) -> None:
    """Fail here if the environment asks for it."""
    faults = _faults()
    if not faults:
        return
    action = faults.get((phase, backend)) or faults.get((phase, None))
    if action is None:
        return
    reached = os.environ.get("SNAPCORE_FAULT_REACHED")
    if reached:
        fd = os.open(reached, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{phase}={action}\n".encode())
        finally:
            os.close(fd)
    if action == "raise":
        raise InjectedFault(f"injected fault: {phase}" + (f" in {backend}" if backend else ""))
    if action == "hang":
        time.sleep(3600)
    elif action == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
