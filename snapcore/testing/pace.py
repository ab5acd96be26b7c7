"""How slow this machine is, measured once per run: every time a test allows (a freeze
deadline, a wait for a guard or a daemon) is scaled by it instead of being a constant
tuned on a fast machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

#: A bare ``python -I -c pass`` on the machine the suite's time allowances were first
#: written on (issue 4's notes: 5.7-5.8 ms): the unit of :class:`Pace`.
REFERENCE_START_S = 0.006


@dataclass(frozen=True, slots=True, kw_only=True)
class Pace:
    """How slow this machine is against the one the suite was tuned on.

    ``factor`` is the measured interpreter start over :data:`REFERENCE_START_S`,
    never below 1: an allowance is only ever stretched, so a fast machine keeps the
    strict figures and a slow or loaded one gets proportionally more time. What a
    test asserts stays the same; only how long it waits for it changes.
    """

    #: median wall time of a bare ``python -I -c pass`` in this run, in seconds
    python_start_s: float
    #: an explicit factor (``SNAPCORE_TEST_PACE``), overriding the measurement
    forced: float | None = None

    @property
    def factor(self) -> float:
        if self.forced is not None:
            return max(1.0, self.forced)
        return max(1.0, self.python_start_s / REFERENCE_START_S)

    def seconds(self, base: float, *, floor: float | None = None) -> float:
        """``base`` seconds (an allowance written for the reference machine) scaled to
        this one; at least ``floor`` (default: ``base``)."""
        return max(base if floor is None else floor, base * self.factor)

    def describe(self) -> str:
        how = f"SNAPCORE_TEST_PACE={self.forced:g}" if self.forced is not None else "measured"
        return (
            f"bare interpreter start {self.python_start_s * 1000:.1f} ms "
            f"(reference {REFERENCE_START_S * 1000:.1f} ms): time allowances x{self.factor:.2f} ({how})"
        )


def measure_python_start(runs: int | None = None) -> float:
    """Median wall time of ``sys.executable -I -c pass``, in seconds (after one warm-up)."""
    if runs is None:  # an emulated guest starts Python in ~0.4 s: fewer there
        runs = 3 if os.environ.get("SNAPCORE_IN_VM") else 7
    times = []
    for i in range(runs + 1):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True, stdin=subprocess.DEVNULL)
        if i:  # the first start warms the page cache
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


_PACE: Pace | None = None


def machine_pace() -> Pace:
    """This process's :class:`Pace`, measured on first use (~50 ms)."""
    global _PACE
    if _PACE is None:
        forced = os.environ.get("SNAPCORE_TEST_PACE")
        try:
            factor = float(forced) if forced else None
        except ValueError:
            raise pytest.UsageError(f"SNAPCORE_TEST_PACE={forced!r} is not a number (a factor, e.g. 3)") from None
        _PACE = Pace(python_start_s=measure_python_start(), forced=factor)
    return _PACE
