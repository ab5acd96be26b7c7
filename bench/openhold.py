"""Benchmark: what ``on_change: delay`` (the open hold) costs other programs' opens.

On an ext4 loop filesystem made here, ``--needed`` files are "needed" (marked with
``FAN_OPEN_PERM``, the hold engaged as while the tasks are frozen) and ``--files``
others are not. A separate process opens and closes files as fast as it can
(``--opens`` per round); each round measures, alternating, without the hold and
with it:

* opens of files that are **not needed** (read, and append): the issue's target is
  >= 0.8x the opens/s without the listener;
* opens of **needed** files for reading: these do reach the listener (one round trip
  through its thread each), shown for what they cost.

Run: ``.venv/bin/python bench/openhold.py [--rounds N]`` (root). Prints opens/s
(median of the rounds) and the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from floor import header, machine_floor

OPENER = r"""
import os, sys, time
flags = {"read": os.O_RDONLY, "append": os.O_WRONLY | os.O_APPEND}[sys.argv[1]]
n, paths = int(sys.argv[2]), sys.argv[3:]
count = len(paths)
t = time.perf_counter()
for i in range(n):
    os.close(os.open(paths[i % count], flags))
print(n / (time.perf_counter() - t))
"""


def opens_per_s(how: str, paths: list[Path], n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-I", "-c", OPENER, how, str(n), *map(str, paths)], check=True, capture_output=True, text=True
    ).stdout
    return float(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--opens", type=int, default=100_000)
    parser.add_argument("--needed", type=int, default=1000)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/openhold.py needs root (loop devices, fanotify permission events)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(header(machine_floor()), flush=True)
    from snapcore.tasks.openhold import HoldFile, HoldMode, OpenHold
    from snapcore.testing import LoopFactory

    with tempfile.TemporaryDirectory(prefix="snapcore-bench-hold-") as tmp:
        loops = LoopFactory(Path(tmp))
        try:
            mnt = loops("ext4").mount_point
            needed = [mnt / f"needed-{i}" for i in range(args.needed)]
            others = [mnt / f"other-{i}" for i in range(args.files)]
            for path in needed + others:
                path.write_bytes(b"x")
            files = []
            for path in needed:
                st = path.stat()
                files.append(HoldFile(path=str(path), dev=st.st_dev, ino=st.st_ino, via=str(path), mode=HoldMode.DELAY))
            cases = {
                "not needed, O_RDONLY": ("read", others),
                "not needed, O_WRONLY|O_APPEND": ("append", others),
                "needed, O_RDONLY (asked)": ("read", needed),
            }
            results: dict[tuple[str, bool], list[float]] = {}
            for _ in range(args.rounds):
                for with_hold in (False, True):
                    hold = None
                    if with_hold:
                        hold = OpenHold(files, limit_s=3600)
                        t = time.perf_counter()
                        hold.start()
                        marks_ms = (time.perf_counter() - t) * 1000
                        hold.engage()
                    try:
                        for name, (how, paths) in cases.items():
                            results.setdefault((name, with_hold), []).append(opens_per_s(how, paths, args.opens))
                    finally:
                        if hold is not None:
                            assert hold.held == [] and hold.failure is None
                            hold.release()
        finally:
            loops.close()
    print(
        f"{args.needed} needed files marked ({marks_ms:.2f} ms for the group and its marks, last round); "
        f"{args.opens} opens per measure, {args.rounds} rounds, medians:"
    )
    for name in cases:
        without = statistics.median(results[(name, False)])
        with_ = statistics.median(results[(name, True)])
        target = "  (target >= 0.80x)" if name.startswith("not needed") else ""
        rates = f"{without:12,.0f}/s without  {with_:12,.0f}/s with the hold"
        print(f"  {name:<32} {rates}  {with_ / without:5.2f}x{target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
