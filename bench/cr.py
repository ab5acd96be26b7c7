"""Benchmark of the checkpoint/restart building blocks (issue 7).

* inventory + change-watch set-up for a task holding 1, 100 and 10 000 open files
  (target: <= 50 µs per file);
* freeze + thaw of a 200-task tree that shares its cgroup (target: <= 5 ms), and
  separately the attach/detach (move into the temporary cgroup and back) done
  outside the freeze window.

Run as root: ``.venv/bin/python bench/cr.py [--repeat N] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from floor import header, machine_floor

from snapcore.host.mounts import MountTable
from snapcore.tasks.changes import ChangeWatch
from snapcore.tasks.freezer import TaskFreezer
from snapcore.tasks.inventory import take_inventory
from snapcore.tasks.resolve import descendants, resolve_pid

HOLDER = r"""
import os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
keep = [os.open(p, os.O_RDONLY) for p in open(sys.argv[2]).read().split("\n") if p]
open(sys.argv[1], "w").close()
while True:
    time.sleep(1)
"""

TREE = r"""
import os, sys, time
for _ in range(int(sys.argv[2]) - 1):
    if os.fork() == 0:
        while True:
            time.sleep(1)
open(sys.argv[1], "w").close()
while True:
    time.sleep(1)
"""


def wait_file(path: Path, proc: subprocess.Popen[bytes]) -> None:
    while not path.exists():
        if proc.poll() is not None:
            raise SystemExit(f"helper process failed ({proc.returncode})")
        time.sleep(0.005)


def kill_tree(pid: int) -> None:
    for p in reversed(descendants(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def bench_files(base: Path, n: int, repeat: int, table: MountTable) -> dict[str, Any]:
    tree = base / f"files-{n}"
    tree.mkdir()
    paths = []
    for i in range(n):
        sub = tree / f"d{i // 100:03d}"
        sub.mkdir(exist_ok=True)
        p = sub / f"f{i % 100:02d}"
        p.write_bytes(b"x")
        paths.append(str(p))
    listing = base / f"list-{n}"
    listing.write_text("\n".join(paths))
    ready = base / f"ready-{n}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), str(listing)], stdin=subprocess.DEVNULL)
    try:
        wait_file(ready, proc)
        inv_ms, watch_ms, watch_ino_ms = [], [], []
        files = 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            inv = take_inventory([proc.pid], table=table)
            t1 = time.perf_counter()
            watch = ChangeWatch(inv)
            watch.start()
            t2 = time.perf_counter()
            watch.stop()
            t3 = time.perf_counter()
            plain = ChangeWatch(inv, fanotify=False, thread=False)
            plain.start()
            t4 = time.perf_counter()
            plain.stop()
            inv_ms.append((t1 - t0) * 1000)
            watch_ms.append((t2 - t1) * 1000)
            watch_ino_ms.append((t4 - t3) * 1000)
            files = len(inv.files)
        inv_med, watch_med = statistics.median(inv_ms), statistics.median(watch_ms)
        return {
            "open_files": n,
            "inventoried_files": files,  # + the interpreter's own (mapped libraries, cwd...)
            "inventory_ms": round(inv_med, 3),
            "watch_setup_ms": round(watch_med, 3),
            "watch_setup_inotify_only_ms": round(statistics.median(watch_ino_ms), 3),
            "us_per_file": round((inv_med + watch_med) * 1000 / files, 2),
            "fanotify_marks": len(watch.fanotify_marks),
        }
    finally:
        proc.kill()
        proc.wait()


def bench_freeze(base: Path, n: int, repeat: int) -> dict[str, Any]:
    ready = base / "tree-ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", TREE, str(ready), str(n)], stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_file(ready, proc)
        while len(descendants(proc.pid)) < n:
            time.sleep(0.01)
        attach, freeze, thaw, total, detach = [], [], [], [], []
        for i in range(repeat):
            freezer = TaskFreezer(resolve_pid(proc.pid), name=f"bench-{os.getpid()}-{i}")
            t0 = time.perf_counter()
            freezer.attach()
            t1 = time.perf_counter()
            freezer.freeze()
            t2 = time.perf_counter()
            freezer.thaw()
            t3 = time.perf_counter()
            freezer.detach()
            t4 = time.perf_counter()
            attach.append((t1 - t0) * 1000)
            freeze.append((t2 - t1) * 1000)
            thaw.append((t3 - t2) * 1000)
            total.append((t3 - t1) * 1000)
            detach.append((t4 - t3) * 1000)
        return {
            "tasks": n,
            "method": freezer.method.value,
            "freeze_ms": round(statistics.median(freeze), 3),
            "thaw_ms": round(statistics.median(thaw), 3),
            "freeze_plus_thaw_ms": round(statistics.median(total), 3),
            "freeze_plus_thaw_max_ms": round(max(total), 3),
            "attach_ms (outside the window)": round(statistics.median(attach), 3),
            "detach_ms (outside the window)": round(statistics.median(detach), 3),
        }
    finally:
        kill_tree(proc.pid)
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/cr.py needs root (map_files, fanotify, cgroups)", file=sys.stderr)
        return 2
    floor = machine_floor()
    if not args.json:
        print(header(floor), flush=True)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    results: dict[str, Any] = {"floor": asdict(floor), "files": [], "freeze": None}
    with tempfile.TemporaryDirectory(prefix="snapcore-bench-cr-") as tmp:
        base = Path(tmp)
        table = MountTable.read()
        for n in (1, 100, 10_000):
            if n + 100 > hard:
                print(f"skipping {n} files: RLIMIT_NOFILE hard limit is {hard}", file=sys.stderr)
                continue
            results["files"].append(bench_files(base, n, args.repeat, table))
        results["freeze"] = bench_freeze(base, 200, args.repeat)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"inventory + watch set-up (median of {args.repeat}; target <= 50 us/file)")
    print(f"{'open':>7} {'files':>7} {'inventory':>11} {'watch':>9} {'inotify-only':>13} {'us/file':>8}")
    for r in results["files"]:
        print(
            f"{r['open_files']:>7} {r['inventoried_files']:>7} {r['inventory_ms']:>9.3f}ms "
            f"{r['watch_setup_ms']:>7.3f}ms {r['watch_setup_inotify_only_ms']:>11.3f}ms {r['us_per_file']:>8.2f}"
        )
    f = results["freeze"]
    print(f"\ntask freeze + thaw, {f['tasks']} tasks ({f['method']}; target <= 5 ms)")
    for key, value in f.items():
        if key not in ("tasks", "method"):
            print(f"  {key:<32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
