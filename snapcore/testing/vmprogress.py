"""The host's half of a test VM run: reading the events the guest streams
(:mod:`snapcore.testing.vmreport` writes them) and judging the run against a
:class:`Budget` derived from what the run itself measured (its boot time, figures the
guest announces), never from a constant tuned on one machine."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Progress:
    """What the host has read of a guest pytest run so far (``events.jsonl``)."""

    path: Path
    #: host monotonic time of the launch
    launched: float
    #: seconds from the launch to the guest's first event: this run's boot time
    boot_s: float | None = None
    #: the guest kernel's uptime at that event
    guest_uptime_s: float | None = None
    collected: int | None = None
    #: figures the guest measured and announced (``snapcore.testing.vmreport.announce``)
    measures: dict[str, float] = field(default_factory=dict)
    #: the test running now and the host time its start was read
    running: str | None = None
    running_since: float = 0.0
    #: host time of the last event of any kind
    last_event: float = 0.0
    #: ``nodeid`` → ``passed`` | ``failed`` | ``error`` | ``skipped``, in order
    outcomes: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    _offset: int = 0

    def poll(self, now: float, on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Read the complete lines the guest appended since the last poll."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for line in data[: end + 1].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self._take(event, now)
                if on_event is not None:
                    on_event(event)

    def _take(self, event: dict[str, Any], now: float) -> None:
        self.last_event = now
        if self.boot_s is None:
            self.boot_s = now - self.launched
        ev = event.get("ev")
        if ev == "session":
            uptime = event.get("uptime")
            self.guest_uptime_s = float(uptime) if isinstance(uptime, (int, float)) else None
        elif ev == "collected":
            self.collected = int(event.get("n") or 0)
        elif ev == "measure":
            figures = event.get("figures")
            if isinstance(figures, dict):
                self.measures.update({str(k): float(v) for k, v in figures.items() if isinstance(v, (int, float))})
        elif ev == "start":
            self.running = str(event.get("nodeid"))
            self.running_since = now
        elif ev == "report":
            self._report(event)
        elif ev == "finish":
            self.running = None

    def _report(self, event: dict[str, Any]) -> None:
        nodeid, when, outcome = str(event.get("nodeid")), event.get("when"), event.get("outcome")
        self.durations[nodeid] = self.durations.get(nodeid, 0.0) + float(event.get("duration") or 0.0)
        if outcome == "failed":
            self.outcomes[nodeid] = "failed" if when == "call" else "error"
            self.messages[nodeid] = self.messages.get(nodeid, "") + str(event.get("message") or "")
        elif outcome == "skipped":
            self.outcomes[nodeid] = "skipped"
            self.messages[nodeid] = str(event.get("message") or "")
        elif when == "call":
            self.outcomes.setdefault(nodeid, "passed")
        if when == "teardown" and self.running == nodeid:
            self.running = None

    def failed(self) -> list[str]:
        return [n for n, o in self.outcomes.items() if o in ("failed", "error")]

    def summary(self, message_chars: int = 1500) -> str:
        """Which test ran, which passed and failed before it (with their messages)."""
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        done = ", ".join(f"{n} {o}" for o, n in sorted(counts.items())) or "none"
        lines = [f"guest tests finished: {done} (of {self.collected if self.collected is not None else '?'} collected)"]
        if self.boot_s is None:
            lines.append("the guest never started its tests (no event from it)")
        else:
            up = f" (guest kernel up {self.guest_uptime_s:.1f}s)" if self.guest_uptime_s is not None else ""
            lines.append(f"first guest event {self.boot_s:.1f}s after the launch{up}")
        if self.running:
            lines.append(f"RUNNING when stopped: {self.running}")
        for nodeid in self.outcomes:
            lines.append(f"  {self.outcomes[nodeid]:<7} {nodeid} ({self.durations.get(nodeid, 0.0):.1f}s)")
        for nodeid in self.failed():
            lines.append(f"--- {nodeid} ---\n{self.messages.get(nodeid, '')[-message_chars:]}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """How long a guest pytest run may take, from what the run itself measures.

    Until the guest's first event nothing is known, so the boot gets a floor
    (``boot_floor_s``). From then on, each test may run for the largest of
    ``test_floor_s``, ``boot_times`` times the boot time just measured, and, for each
    figure the guest announced, ``per_measure[name]`` times that figure (e.g.
    40 times one ``lvcreate -s``). Outside any test (collection, session fixtures,
    the shutdown) the same allowance counts from the guest's last event.
    """

    boot_floor_s: float = 300.0
    test_floor_s: float = 60.0
    boot_times: float = 6.0
    per_measure: Mapping[str, float] = field(default_factory=dict)

    def per_test(self, progress: Progress) -> tuple[float, str]:
        """The allowance of one test now, and how it was derived (for the report)."""
        terms = [(self.test_floor_s, f"floor {self.test_floor_s:g}s")]
        if progress.boot_s is not None:
            terms.append((self.boot_times * progress.boot_s, f"{self.boot_times:g} x boot {progress.boot_s:.1f}s"))
        for name, times in self.per_measure.items():
            if name in progress.measures:
                value = progress.measures[name]
                terms.append((times * value, f"{times:g} x {name} {value:.2f}s"))
        seconds = max(t for t, _ in terms)
        return seconds, f"{seconds:.0f}s = max({', '.join(w for _, w in terms)})"

    def exceeded(self, progress: Progress, now: float) -> str | None:
        """Why the run has overstayed, or None while it is within its allowance."""
        if progress.boot_s is None:
            if now - progress.launched > self.boot_floor_s:
                return f"the guest sent no event within {self.boot_floor_s:g}s of the launch (boot budget)"
            return None
        allowance, why = self.per_test(progress)
        if progress.running is not None:
            if now - progress.running_since > allowance:
                return f"guest test {progress.running} ran {now - progress.running_since:.0f}s; allowed {why}"
            return None
        if now - progress.last_event > allowance:
            return f"no guest event for {now - progress.last_event:.0f}s outside any test; allowed {why}"
        return None
