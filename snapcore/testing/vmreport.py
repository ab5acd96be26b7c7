"""The guest's half of a test VM run: pytest results streamed to the host as they happen.

Loaded inside the guest (``-p snapcore.testing.vmreport``) by :meth:`snapcore.testing.vm.TestVM.pytest`.
Each event is one JSON line appended, unbuffered, to ``$SNAPCORE_VM_OUT/events.jsonl``
(a directory shared with the host over 9p), so the host reads the run while it goes:
which test is running, what passed and failed before it and why, and the guest's own
measurements (:func:`announce`) from which the host derives its time allowances. If
the guest hangs, the host still knows everything up to the hang; a JUnit file written
at the end would say nothing.

Events (``ev``): ``session`` (the guest's uptime: its boot time), ``collected``,
``start`` (a test's node id), ``report`` (a phase's outcome, duration and, on
failure, the message), ``measure`` (named figures, e.g. one ``lvcreate -s``), and
``finish`` (pytest's exit status).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

#: The file name under ``SNAPCORE_VM_OUT`` (read by snapcore.testing.vm).
EVENTS = "events.jsonl"
#: How much of a failure's text travels to the host.
MESSAGE_CHARS = 4000


def _path() -> str | None:
    out = os.environ.get("SNAPCORE_VM_OUT")
    return os.path.join(out, EVENTS) if out else None


def emit(ev: str, **fields: Any) -> None:
    """Append one event (a no-op outside a test VM)."""
    path = _path()
    if path is None:
        return
    line = json.dumps({"ev": ev, "t": round(time.time(), 3), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def announce(**figures: float) -> None:
    """Send measurements made in the guest to the host (``measure`` event), e.g.
    ``announce(lvcreate_s=2.1)``: the host scales its per-test allowance by them."""
    emit("measure", figures=figures)


def _uptime() -> float | None:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pytest_sessionstart(session: pytest.Session) -> None:
    emit("session", uptime=_uptime())


def pytest_collection_finish(session: pytest.Session) -> None:
    emit("collected", n=len(session.items))


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    emit("start", nodeid=nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    fields: dict[str, Any] = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": round(report.duration, 3),
    }
    if report.failed or report.skipped:
        text = report.longreprtext if report.failed else _skip_reason(report)
        fields["message"] = text[-MESSAGE_CHARS:]
    emit("report", **fields)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    emit("finish", exitstatus=int(exitstatus))
