"""The machine's floor, printed at the top of every benchmark, and what they share.

Figures from two machines differ by more than snapcore's cost: a bare interpreter
start took 16-23 ms on one and ~6 ms on another, while an idle FIFREEZE is a fixed
kernel wait (~22-30 ms) on both. So each benchmark starts by measuring

* a bare interpreter start, ``sys.executable -I -c pass`` (median of several, after a
  warm-up: ``snapcore.testing.measure_python_start``, the pace of the test suite), and
* one raw FIFREEZE+FITHAW pair on an idle ext4 loop filesystem made here for it
  (median of a few, an idle pause before each, as ``bench/freeze.py`` measures),

and prints them with the interpreter and the kernel (:func:`header`). Beside each
ratio of a framework figure to a raw one, :func:`ratio` adds the fixed cost the
framework adds (its median minus the raw median), e.g. ``1.03x (+0.04 ms)``.

Only stdlib modules are imported at the top: ``bench/safety.py`` imports its own
module in the fresh interpreters it measures, and this one with it.
"""

from __future__ import annotations

import fcntl
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
PAUSE_S = 0.15


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """``n`` back-to-back runs of ``fn``, each in ms."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def raw_one(path: str) -> float:
    """One FIFREEZE+FITHAW of the filesystem mounted at ``path``, in ms."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t = time.perf_counter()
        fcntl.ioctl(fd, FIFREEZE, 0)
        try:
            pass  # nothing in the window: the pair's own cost
        finally:
            fcntl.ioctl(fd, FITHAW, 0)
        return (time.perf_counter() - t) * 1000
    finally:
        os.close(fd)


def measure(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each contender once to warm up, then ``rounds`` rounds, alternating them, an
    idle pause before each: an idle freeze's cost is mostly a kernel wait that
    back-to-back freezes skip."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up: page cache, imports, first syncfs
        fn()
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(PAUSE_S)
            results[name].append(fn())
    return results


@dataclass(frozen=True, slots=True)
class Floor:
    python_start_ms: float
    starts: int
    #: None when not root (no loop filesystem, no FIFREEZE)
    freeze_thaw_ms: float | None
    freezes: int
    python: str
    kernel: str


def machine_floor(starts: int = 10, freezes: int = 5) -> Floor:
    """Measure the floor: medians of ``starts`` bare interpreter starts and of
    ``freezes`` FIFREEZE+FITHAW pairs on an idle ext4 loop filesystem this makes
    (and removes) for them."""
    from snapcore.testing import LoopFactory, measure_python_start

    python_start_ms = measure_python_start(runs=starts) * 1000
    freeze: float | None = None
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory(prefix="snapcore-bench-floor-") as tmp:
            loops = LoopFactory(Path(tmp))
            try:
                mount = str(loops("ext4").mount_point)
                freeze = statistics.median(measure({"raw": lambda: raw_one(mount)}, freezes)["raw"])
            finally:
                problems = loops.close()
                for p in problems:
                    print(f"teardown: {p}", file=sys.stderr)
    return Floor(
        python_start_ms=python_start_ms,
        starts=starts,
        freeze_thaw_ms=freeze,
        freezes=freezes,
        python=f"Python {sys.version.split()[0]} ({os.path.realpath(sys.executable)})",
        kernel=f"Linux {os.uname().release}, {os.cpu_count()} CPUs",
    )


def header(floor: Floor) -> str:
    """The floor as one line, for the top of a benchmark's output."""
    freeze = (
        f"{floor.freeze_thaw_ms:.2f} ms (median of {floor.freezes})"
        if floor.freeze_thaw_ms is not None
        else "not measured (needs root)"
    )
    return (
        f"machine floor: python -I -c pass {floor.python_start_ms:.2f} ms (median of {floor.starts}); "
        f"raw FIFREEZE+FITHAW, idle ext4 loop {freeze}; {floor.python}; {floor.kernel}"
    )


def ratio(framework_ms: float, raw_ms: float, *, inverted: bool = False, spec: str = "5.2f", unit: str = "x") -> str:
    """``framework / raw`` (``raw / framework`` if ``inverted``: a speed-up) followed by
    the fixed cost the framework adds, its median minus the raw one: ``1.03x (+0.04 ms)``."""
    value = raw_ms / framework_ms if inverted else framework_ms / raw_ms
    return f"{value:{spec}}{unit} ({framework_ms - raw_ms:+.2f} ms)"
