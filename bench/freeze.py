"""Benchmark: the freeze window of snapcore against raw FIFREEZE/FITHAW and fsfreeze(8).

Run as root: ``make bench`` or ``.venv/bin/python bench/freeze.py [--rounds N]``.
Everything is measured in one run on loop filesystems this script makes (and
removes), alternating the contenders round by round with an idle pause between
freezes, since an idle freeze's cost is mostly a kernel wait that back-to-back
freezes skip. Prints medians and the ratios the issue sets as targets.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from floor import FIFREEZE, FITHAW, header, machine_floor, measure, ratio, raw_one, timed


def raw_sequential(paths: list[str]) -> float:
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in paths]
    try:
        t = time.perf_counter()
        for fd in fds:
            fcntl.ioctl(fd, FIFREEZE, 0)
        for fd in reversed(fds):
            fcntl.ioctl(fd, FITHAW, 0)
        return (time.perf_counter() - t) * 1000
    finally:
        for fd in fds:
            os.close(fd)


class RawThreads:
    """Pre-started threads, one per mount: freeze all in parallel, then thaw all."""

    def __init__(self, paths: list[str]) -> None:
        self.fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in paths]
        self.go = threading.Barrier(len(paths) + 1)
        self.done = threading.Barrier(len(paths) + 1)
        self.stop = False
        self.threads = [threading.Thread(target=self._work, args=(fd,), daemon=True) for fd in self.fds]
        for t in self.threads:
            t.start()

    def _work(self, fd: int) -> None:
        while True:
            self.go.wait()
            if self.stop:
                return
            fcntl.ioctl(fd, FIFREEZE, 0)
            self.done.wait()

    def __call__(self) -> float:
        t = time.perf_counter()
        self.go.wait()
        self.done.wait()
        for fd in reversed(self.fds):
            fcntl.ioctl(fd, FITHAW, 0)
        return (time.perf_counter() - t) * 1000

    def close(self) -> None:
        self.stop = True
        self.go.wait()
        for fd in self.fds:
            os.close(fd)


def fsfreeze_processes(path: str) -> float:
    t = time.perf_counter()
    subprocess.run(["fsfreeze", "-f", path], check=True)
    subprocess.run(["fsfreeze", "-u", path], check=True)
    return (time.perf_counter() - t) * 1000


def snapcore_window(paths: list[str], state: Path) -> Callable[[], float]:
    from snapcore.plugins import make_plugins
    from snapcore.policy import Policy
    from snapcore.transaction import Transaction

    plugins = make_plugins()
    policy = Policy.default()

    def run() -> float:
        txn = Transaction(plugins, policy, paths, state_dir=state)
        manifest = txn.run()
        assert manifest.outcome == "ok" and manifest.freeze_window_ms is not None
        return manifest.freeze_window_ms

    return run


def help_time(rounds: int) -> float:
    exe = str(Path(sys.executable).with_name("snapcore"))
    return statistics.median(
        timed(lambda: subprocess.run([exe, "--help"], check=True, stdout=subprocess.DEVNULL), rounds)
    )


def show(results: dict[str, list[float]]) -> dict[str, float]:
    medians = {}
    for name, values in results.items():
        med = statistics.median(values)
        medians[name] = med
        q = statistics.quantiles(values, n=10) if len(values) >= 2 else [med] * 9
        print(f"  {name:<34} median {med:8.2f} ms   p10 {q[0]:8.2f}   p90 {q[-1]:8.2f}   (n={len(values)})")
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mounts", type=int, default=16)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/freeze.py needs root (loop devices, FIFREEZE)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(header(machine_floor()), flush=True)
    # The framework's own cost is measured with the fsfreeze backend alone; other
    # installed backends' probes run too in a real checkpoint (SNAPCORE_PLUGINS=all).
    if os.environ.get("SNAPCORE_PLUGINS") == "all":
        del os.environ["SNAPCORE_PLUGINS"]
    else:
        os.environ.setdefault("SNAPCORE_PLUGINS", "fsfreeze")
    print(f"plugins: {os.environ.get('SNAPCORE_PLUGINS', 'all installed')}")
    from snapcore.testing import LoopFactory

    with tempfile.TemporaryDirectory(prefix="snapcore-bench-") as tmp:
        base = Path(tmp)
        loops = LoopFactory(base)
        try:
            mounts = [str(loops("ext4").mount_point) for _ in range(args.mounts)]
            state = base / "state"
            print(f"1 idle ext4 loop mount, {args.rounds} rounds:")
            one = show(
                measure(
                    {
                        "raw FIFREEZE+FITHAW": lambda: raw_one(mounts[0]),
                        "fsfreeze -f/-u (processes)": lambda: fsfreeze_processes(mounts[0]),
                        "snapcore freeze window": snapcore_window(mounts[:1], state),
                    },
                    args.rounds,
                )
            )
            print(f"\n{args.mounts} idle ext4 loop mounts, {args.rounds} rounds:")
            threads = RawThreads(mounts)
            try:
                many = show(
                    measure(
                        {
                            "raw, one after another": lambda: raw_sequential(mounts),
                            f"raw, {args.mounts} threads": threads,
                            "snapcore freeze window": snapcore_window(mounts, state),
                        },
                        args.rounds,
                    )
                )
            finally:
                threads.close()
        finally:
            loops.close()
    helptime = help_time(10)
    raw1 = one["raw FIFREEZE+FITHAW"]
    sc1 = one["snapcore freeze window"]
    rawn = many[f"raw, {args.mounts} threads"]
    scn = many["snapcore freeze window"]
    print("\nratios (targets from issue 3), each with snapcore's median minus the other's:")
    print(f"  1 mount:  snapcore / raw                      {ratio(sc1, raw1)}  (target <= 1.05x)")
    print(f"  {args.mounts} mounts: snapcore / raw {args.mounts} threads          {ratio(scn, rawn)}  (target <= 1.1x)")
    print(f"  {args.mounts} mounts: snapcore / one single freeze+thaw {ratio(scn, raw1)}  (aim <= 1.5x)")
    seq = many["raw, one after another"]
    print(f"  {args.mounts} mounts: raw sequential / snapcore      {ratio(scn, seq, inverted=True, unit='x faster')}")
    per_target = max(0.0, (scn - rawn)) / args.mounts
    print(f"  framework time in the window per target   {per_target:6.3f} ms (target <= 1 ms)")
    fsfreeze = one["fsfreeze -f/-u (processes)"]
    print(f"  fsfreeze processes / snapcore (1 mount)    {ratio(sc1, fsfreeze, inverted=True)}")
    print(f"  snapcore --help                          {helptime:7.1f} ms (target < 150 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
