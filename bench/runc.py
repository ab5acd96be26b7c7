"""Benchmark: how much longer a runc container stands still because of snapcore.

Run as root: ``.venv/bin/python bench/runc.py [--rounds N] [--rootfs-mib M]``. A busybox
container on a btrfs subvolume (mounted on its own, on a loop device this script
makes and removes) with M MiB of files in its rootfs is checkpointed and restored
with runc, round by round in turn:

* checkpoint, three ways: ``runc checkpoint`` without an action script; the same
  with snapcore's hook (``criu-hook --write-script``) in the CRIU config runc hands
  CRIU; and ``snapcore checkpoint --container runc:ID -- runc ... checkpoint``, whose
  relay hands post-dump to the snapcore already running. What counts is how long
  the container stands still: from CRIU's ``freezing cgroup`` to its
  ``Unfreezing tasks`` in the dump log (CRIU's own timestamps); the command's wall
  time is printed too;
* restore: ``runc restore`` alone, against ``snapcore restore ID --in-place -- runc
  restore`` (the files rolled back first), with and without criu-hook in CRIU's
  config (it then sees them in place and returns): how long the restored tasks are
  held stopped (CRIU's log: the first "Forking task" to "Tasks resumed"), and the
  wall time, the rollback before the runtime included; and, as that wall time's
  floor, a rollback done with the btrfs tools themselves.

Prints medians and the ratios (issue 17's target: <= 1.2x); ``bench/criu_hook.py``
measures the hook's cost per ignored action.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from floor import header, machine_floor, ratio

HERE = Path(__file__).resolve().parent
PROGRAM = "i=0; while :; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"


def sh(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def criu_path() -> str:
    for candidate in (os.environ.get("CRIU"), "/usr/local/sbin/criu", shutil.which("criu")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("no CRIU: run make setup")


class Bench:
    def __init__(self, base: Path, mib: int) -> None:
        self.base = base
        self.image = base / "btrfs.img"
        with open(self.image, "wb") as f:
            f.truncate((mib * 3 + 256) << 20)
        sh("mkfs.btrfs", "-q", "-f", str(self.image))
        self.top, self.rootfs = base / "top", base / "rootfs"
        self.top.mkdir()
        self.rootfs.mkdir()
        sh("mount", "-o", "loop", str(self.image), str(self.top))
        sh("btrfs", "-q", "subvolume", "create", str(self.top / "rootfs"))
        sh("mount", "-o", "loop,subvol=rootfs", str(self.image), str(self.rootfs))
        for d in ("bin", "proc", "dev", "sys", "tmp", "data", "etc", "payload"):
            (self.rootfs / d).mkdir()
        shutil.copy2("/usr/bin/busybox", self.rootfs / "bin" / "busybox")
        for applet in ("sh", "sleep", "echo"):
            (self.rootfs / "bin" / applet).symlink_to("busybox")
        for i in range(mib):
            (self.rootfs / "payload" / f"f{i}").write_bytes(os.urandom(1 << 20))
        os.sync()
        self.state, self.run_dir = base / "state", base / "run"
        self.hook = base / "hook"
        snapcore = [sys.executable, "-m", "snapcore", "--state-dir", str(self.state), "--run-dir", str(self.run_dir)]
        self.snapcore = snapcore
        sh(*snapcore, "criu-hook", "--write-script", str(self.hook))
        self.conf = base / "criu.conf"
        self.bundle = base / "bundle"
        self.bundle.mkdir()
        sh("runc", "spec", cwd=self.bundle)
        config = json.loads((self.bundle / "config.json").read_text())
        config["root"] = {"path": str(self.rootfs), "readonly": False}
        config["process"]["terminal"] = False
        config["process"]["args"] = ["sh", "-c", PROGRAM]
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        config["annotations"] = {"org.criu.config": str(self.conf)}
        (self.bundle / "config.json").write_text(json.dumps(config))
        self.runc = ["runc", "--root", str(base / "runc"), "--criu", criu_path()]
        self.n = 0
        self.running: list[str] = []

    def runc_do(self, *args: str) -> float:
        t = time.perf_counter()
        subprocess.run(
            [*self.runc, *args],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return (time.perf_counter() - t) * 1000

    def round(self, how: str) -> dict[str, float]:
        """One checkpoint (``how``: none, hook or relay) and one restore: the
        container's stopped time and the commands' wall times."""
        self.n += 1
        cid, images = f"b{self.n}", self.base / f"images-{self.n}"
        self.conf.write_text(f"action-script {self.hook}\n" if how == "hook" else "")
        self.runc_do("run", "-d", "--bundle", str(self.bundle), cid)
        self.running.append(cid)
        time.sleep(0.3)
        dump_args = ["checkpoint", "--image-path", str(images), "--work-path", str(images), cid]
        if how == "relay":
            t = time.perf_counter()
            argv = [*self.snapcore, "checkpoint", "--container", f"runc:{cid}", "--", *self.runc, *dump_args]
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr}")
            dump = (time.perf_counter() - t) * 1000
        else:
            dump = self.runc_do(*dump_args)
        stopped, post_dump = stopped_ms((images / "dump.log").read_text(errors="replace"))
        restore_args = ["restore", "-d", "--bundle", str(self.bundle), "--image-path", str(images)]
        restore_args += ["--work-path", str(images / "r"), cid]
        if how != "none":
            checkpoint_id = (images / "snapcore-checkpoint").read_text().split()[0]
            t = time.perf_counter()
            argv = [*self.snapcore, "restore", checkpoint_id, "--in-place", "--", *self.runc, *restore_args]
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            restore = (time.perf_counter() - t) * 1000
        else:
            restore = self.runc_do(*restore_args)
        restore_stopped = restored_ms((images / "r" / "restore.log").read_text(errors="replace"))
        subprocess.run([*self.runc, "delete", "-f", cid], check=False, capture_output=True)
        self.running.remove(cid)
        shutil.rmtree(images, ignore_errors=True)
        # every round starts from one rootfs with no images in it: a rollback carries
        # the images nested in the subvolume over, one by one
        made = sorted(p.name for p in (self.state / "checkpoints").iterdir()) if self.state.exists() else []
        if made:
            sh(*self.snapcore, "delete", *sorted(made, key=lambda n: not n.startswith("before-restore-")))
        return {
            "stopped": stopped,
            "post_dump": post_dump,
            "dump": dump,
            "restore": restore,
            "restore_stopped": restore_stopped,
        }

    def raw_rollback(self) -> float:
        """The floor of a rollback in place, as a shell script would do it with the
        tools themselves: a writable snapshot of a read-only image, the mount taken
        away, the subvolumes swapped (the nested images carried over, each made
        writable for its move), mounted again."""
        device = sh("findmnt", "-n", "-o", "SOURCE", "--target", str(self.top)).stdout.strip()
        image, new, aside = self.top / "raw-image", self.top / "raw-new", self.top / "raw-aside"
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(self.rootfs), str(image))
        t = time.perf_counter()
        sh("btrfs", "-q", "subvolume", "snapshot", str(image), str(new))
        sh("umount", str(self.rootfs))
        os.rename(self.top / "rootfs", aside)
        os.rename(new, self.top / "rootfs")
        nested = aside / ".snapshots"
        subvolumes = [e for e in nested.iterdir() if e.is_dir() and e.stat().st_ino == 256] if nested.exists() else []
        for entry in subvolumes:
            # snapcore's images, subvolumes in .snapshots: the copy has empty
            # directories in their place
            placeholder = self.top / "rootfs" / ".snapshots" / entry.name
            if placeholder.is_dir():
                placeholder.rmdir()
            # a read-only subvolume cannot move: writable for the move, as snapcore does
            sh("btrfs", "property", "set", "-ts", str(entry), "ro", "false")
            os.rename(entry, placeholder)
            sh("btrfs", "property", "set", "-ts", str(placeholder), "ro", "true")
        sh("mount", "-o", "subvol=rootfs", device, str(self.rootfs))
        took = (time.perf_counter() - t) * 1000
        sh("btrfs", "-q", "subvolume", "delete", str(image), str(aside))
        return took

    def close(self) -> None:
        for cid in self.running:  # a round that failed: its container would outlive us
            subprocess.run([*self.runc, "delete", "-f", cid], check=False, capture_output=True)
        for where in (self.rootfs, self.top):
            subprocess.run(["umount", "-R", str(where)], check=False, capture_output=True)


def stopped_ms(log: str) -> tuple[float, float]:
    """From a CRIU dump log: how long the tasks stood still (from "freezing cgroup"
    to "Unfreezing tasks"), and how long the post-dump scripts took."""
    stamps: dict[str, float] = {}
    for line in log.splitlines():
        for key, marker in (
            ("freeze", "freezing cgroup "),
            ("post", "Running post-dump scripts"),
            ("thaw", "Unfreezing tasks"),
        ):
            if marker in line and key not in stamps and line.startswith("("):
                stamps[key] = float(line[1 : line.index(")")])
    stamps.setdefault("post", stamps.get("thaw", 0.0))  # no action script: no post-dump line
    if len(stamps) != 3:
        raise SystemExit(f"the dump log lacks CRIU's freeze/unfreeze lines: {sorted(stamps)}")
    return (stamps["thaw"] - stamps["freeze"]) * 1000, (stamps["thaw"] - stamps["post"]) * 1000


def restored_ms(log: str) -> float:
    """From a CRIU restore log: how long the tasks existed stopped (the first "Forking
    task" to "Restore finished successfully. Tasks resumed.")."""
    start = end = None
    for line in log.splitlines():
        if start is None and "Forking task" in line and line.startswith("("):
            start = float(line[1 : line.index(")")])
        elif "Restore finished successfully" in line and line.startswith("("):
            end = float(line[1 : line.index(")")])
    if start is None or end is None:
        raise SystemExit("the restore log lacks CRIU's forking/finished lines")
    return (end - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rootfs-mib", type=int, default=100)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("runc") is None:
        raise SystemExit("run as root, with runc installed (make setup)")
    print(header(machine_floor()))
    base = Path(tempfile.mkdtemp(prefix="snapcore-bench-runc-"))
    bench = Bench(base, args.rootfs_mib)
    ways = ("none", "hook", "relay")
    rounds: dict[str, list[dict[str, float]]] = {how: [] for how in ways}
    try:
        bench.round("none")  # warm-up: page cache, runc and CRIU binaries
        for _ in range(args.rounds):
            for how in ways:
                rounds[how].append(bench.round(how))
        raw = statistics.median(bench.raw_rollback() for _ in range(args.rounds))
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)
    med = {how: {k: statistics.median(r[k] for r in rounds[how]) for k in rounds[how][0]} for how in ways}
    print(f"runc container, {args.rootfs_mib} MiB rootfs on a btrfs subvolume, median of {args.rounds} rounds (ms):")
    print(f"  {'':34} {'stopped':>8} {'post-dump':>10} {'wall':>8}")
    names = {
        "none": "runc checkpoint",
        "hook": "  + criu-hook in CRIU's config",
        "relay": "snapcore checkpoint --container",
    }
    for how in ways:
        m = med[how]
        print(f"  {names[how]:34} {m['stopped']:8.1f} {m['post_dump']:10.1f} {m['dump']:8.1f}")
    base_stop = med["none"]["stopped"]
    print(f"  stopped, criu-hook / without:              {ratio(med['hook']['stopped'], base_stop)}")
    print(f"  stopped, --container (relay) / without:    {ratio(med['relay']['stopped'], base_stop)} (target <= 1.2x)")
    # CRIU's cgroup freeze waits in 100 ms steps, which the stopped times above
    # include or not from round to round; snapcore's own share is its post-dump
    added = base_stop + med["relay"]["post_dump"]
    print(f"  runc's stopped time + the relay's post-dump / runc's: {ratio(added, base_stop)}")
    print("  restore: the tasks held stopped (CRIU's log: first fork to resumed), and the wall time:")
    restores = {
        "none": "runc restore",
        "hook": "snapcore restore -- runc restore, criu-hook",
        "relay": "snapcore restore -- runc restore",
    }
    for how in ways:
        m = med[how]
        print(f"  {restores[how]:44} {m['restore_stopped']:8.1f} {m['restore']:8.1f}")
    base_restore = med["none"]["restore_stopped"]
    print(f"  held stopped, with criu-hook / without:    {ratio(med['hook']['restore_stopped'], base_restore)}")
    print(f"  wall, with / without:                      {ratio(med['relay']['restore'], med['none']['restore'])}")
    floor = med["none"]["restore"] + raw
    print(f"  the floor: a raw rollback (btrfs snapshot, swap, remount: {raw:.1f} ms) before runc restore:")
    print(f"  (raw rollback + runc restore) / runc restore: {ratio(floor, med['none']['restore'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
