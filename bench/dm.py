"""Benchmark of the dm backend, run inside the test VM (the host has no device-mapper).

    .venv/bin/python bench/dm.py [--rounds N] [--json]

On the host it boots the VM twice (once with ``true``, for the boot time; once for
the benchmark) and prints the figures the guest measured:

* raw ``lvcreate -s`` against snapcore's dm snapshot hook (``snapcore_snapshot``,
  what runs inside the freeze window), thick and thin, alternated; target <= 1.1x;
* the whole ``snapcore.checkpoint`` of one dm target: its ``freeze_window_ms`` and
  the longest stall a writer saw (a process appending 4 KiB blocks without pause);
* the same stall around a raw ``lvcreate -s``, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from floor import header, machine_floor

ROOT = Path(__file__).resolve().parents[1]
VG = "benchvg"

WRITER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
out = open(sys.argv[2], "w")
block = b"w" * 4096
last = time.monotonic()
written = 0
while True:
    os.write(fd, block)
    written += 1
    if written % 2048 == 0:
        os.lseek(fd, 0, 0)
    now = time.monotonic()
    if now - last > 0.005:
        out.write(f"{last:.6f} {now:.6f}\n")
        out.flush()
    last = now
"""


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


class Writer:
    """Appends 4 KiB blocks without pause; logs every gap over 5 ms."""

    def __init__(self, mount: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(mount / "writer.bin"), str(log)])
        time.sleep(0.5)

    def longest_gap_ms(self, start: float, end: float) -> float:
        worst = 0.0
        for line in self.log.read_text().splitlines():
            a, b = (float(x) for x in line.split())
            if b >= start and a <= end:
                worst = max(worst, b - a)
        return worst * 1000

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def guest(rounds: int, out: Path) -> None:
    import snapcore
    from snapcore import Role, Target
    from snapcore.host.mounts import MountTable
    from snapcore_dm import hooks

    scratch = Path("/run/bench-dm")
    scratch.mkdir(exist_ok=True)
    image = scratch / "pv.img"
    with open(image, "wb") as f:
        f.truncate(2 << 30)
    loop = sh("losetup", "--find", "--show", str(image)).strip()
    results: dict[str, Any] = {"rounds": rounds}
    try:
        sh("lvm", "pvcreate", "-q", "-y", loop)
        sh("lvm", "vgcreate", "-q", VG, loop)
        sh("lvm", "lvcreate", "-q", "--type", "thin-pool", "-L", "600M", "-n", "pool", VG)
        sh("lvm", "lvcreate", "-q", "-y", "-L", "256M", "-n", "thick", VG)
        sh("lvm", "lvcreate", "-q", "-V", "256M", "-T", f"{VG}/pool", "-n", "thin")
        mounts = {}
        for kind in ("thick", "thin"):
            dev = f"/dev/mapper/{VG}-{kind}"
            sh("mkfs.ext4", "-q", dev)
            mnt = scratch / kind
            mnt.mkdir(exist_ok=True)
            sh("mount", dev, str(mnt))
            for i in range(200):
                (mnt / f"f{i}").write_bytes(os.urandom(8192))
            mounts[kind] = mnt
        os.sync()

        for kind, mnt in mounts.items():
            raw_s: list[float] = []
            sc_s: list[float] = []
            table = MountTable.read()
            mount = table.find(mnt)
            size = ["-L", "32M"] if kind == "thick" else ["-kn"]

            tagged_s: list[float] = []
            steps = ("raw", "tagged", "ours")
            for r in range(rounds):  # rotate which goes first
                for step in steps[r % 3 :] + steps[: r % 3]:
                    if step in ("raw", "tagged"):
                        # the same argv as snapcore's ('tagged'), or a bare lvcreate -s ('raw')
                        tags = (
                            ["--addtag", "snapcore", "--addtag", f"snapcore-checkpoint=t{r}"]
                            if step == "tagged"
                            else []
                        )
                        sh("lvm", "lvs", f"{VG}/{kind}")  # what snapcore's prepare does too
                        os.sync()
                        time.sleep(0.5)  # let the previous round's lvremove settle
                        t = time.perf_counter()
                        sh("lvm", "lvcreate", "-q", "-s", *size, *tags, "-n", f"{step}{r}", f"{VG}/{kind}")
                        (raw_s if step == "raw" else tagged_s).append(time.perf_counter() - t)
                        sh("lvm", "lvremove", "-q", "-y", f"{VG}/{step}{r}")
                        continue
                    target = Target(
                        checkpoint_id=f"bench{r}", mount=mount, imager="dm", options={"dm": {"size": "32M"}}
                    )
                    hooks.snapcore_prepare(target, Role.IMAGER)
                    time.sleep(0.5)
                    t = time.perf_counter()
                    hooks.snapcore_freeze(target)
                    snap = hooks.snapcore_snapshot(target)
                    hooks.snapcore_thaw(target)
                    sc_s.append(time.perf_counter() - t)
                    hooks.snapcore_discard(target, snap, None)
            results[f"{kind}_raw_lvcreate_s"] = raw_s
            results[f"{kind}_raw_tagged_lvcreate_s"] = tagged_s
            results[f"{kind}_ratio_tagged_median"] = statistics.median(sc_s) / statistics.median(tagged_s)
            results[f"{kind}_snapcore_snapshot_s"] = sc_s
            results[f"{kind}_ratio_median"] = statistics.median(sc_s) / statistics.median(raw_s)
            results[f"{kind}_ratio_min"] = min(sc_s) / min(raw_s)

        # the freeze window a writer sees: snapcore checkpoint vs raw lvcreate
        mnt = mounts["thick"]
        writer = Writer(mnt, scratch / "gaps.log")
        try:
            windows, stalls, raw_stalls = [], [], []
            policy = scratch / "policy.yaml"
            policy.write_text(f"version: 1\nmounts:\n  {mnt}:\n    imager: dm\n    options:\n      dm: {{size: 32M}}\n")
            for r in range(rounds):
                start = time.monotonic()
                manifest = snapcore.checkpoint(policy=policy, state_dir=scratch / "state", checkpoint_id=f"cp{r}")
                end = time.monotonic()
                windows.append(manifest.freeze_window_ms)
                stalls.append(writer.longest_gap_ms(start, end))
                sh("lvm", "lvremove", "-q", "-y", f"{VG}/{manifest.targets[0].image.split('/')[1]}")  # type: ignore[union-attr]
                start = time.monotonic()
                sh("lvm", "lvcreate", "-q", "-s", "-L", "32M", "-n", f"rawcp{r}", f"{VG}/thick")
                end = time.monotonic()
                raw_stalls.append(writer.longest_gap_ms(start, end))
                sh("lvm", "lvremove", "-q", "-y", f"{VG}/rawcp{r}")
        finally:
            writer.stop()
        results["checkpoint_freeze_window_ms"] = windows
        results["checkpoint_writer_stall_ms"] = stalls
        results["raw_lvcreate_writer_stall_ms"] = raw_stalls
    finally:
        for kind in ("thick", "thin"):
            subprocess.run(["umount", str(scratch / kind)], capture_output=True, check=False)
        subprocess.run(["lvm", "vgremove", "-q", "-f", VG], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        image.unlink(missing_ok=True)
    out.write_text(json.dumps(results, indent=2))


def fmt(values: list[float], scale: float = 1.0, unit: str = "") -> str:
    v = [x * scale for x in values]
    return f"median {statistics.median(v):.1f}{unit} (min {min(v):.1f}, max {max(v):.1f}, n={len(v)})"


def host(rounds: int, as_json: bool) -> int:
    sys.path.insert(0, str(ROOT))
    from snapcore.testing.vm import TestVM, VMUnavailable

    try:
        vm = TestVM(workdir=Path(tempfile.mkdtemp(prefix="bench-dm-")))
    except VMUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    # the host's floor: the figures below are the guest's (software-emulated qemu)
    floor = machine_floor()
    if not as_json:
        print(header(floor), flush=True)
    boot = vm.run("true", cwd=ROOT)
    if not boot.ok:
        print(boot.describe(), file=sys.stderr)
        return 1
    result = vm.run(
        f'python bench/dm.py --guest --rounds {rounds} --out "$SNAPCORE_VM_OUT/bench.json"', cwd=ROOT, timeout=900
    )
    if not result.ok:
        print(result.describe(), file=sys.stderr)
        return 1
    data = json.loads((result.outdir / "bench.json").read_text())
    data["vm_boot_true_s"] = boot.seconds
    data["vm_bench_boot_total_s"] = result.seconds
    data["host_floor"] = asdict(floor)
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"VM boot + 'true' + shutdown: {boot.seconds:.1f} s (whole benchmark boot: {result.seconds:.1f} s)")
    for kind in ("thick", "thin"):
        print(f"{kind}: raw lvcreate -s      {fmt(data[f'{kind}_raw_lvcreate_s'], 1000, ' ms')}")
        print(f"{kind}: raw, snapcore's argv {fmt(data[f'{kind}_raw_tagged_lvcreate_s'], 1000, ' ms')}")
        print(f"{kind}: snapcore dm snapshot {fmt(data[f'{kind}_snapcore_snapshot_s'], 1000, ' ms')}")
        print(
            f"{kind}: ratio of medians {data[f'{kind}_ratio_median']:.3f}x, of minimums "
            f"{data[f'{kind}_ratio_min']:.3f}x; vs the same argv run raw {data[f'{kind}_ratio_tagged_median']:.3f}x "
            "(target <= 1.1x)"
        )
    print(f"checkpoint freeze_window_ms: {fmt(data['checkpoint_freeze_window_ms'], 1, ' ms')}")
    print(f"writer's longest stall, snapcore checkpoint: {fmt(data['checkpoint_writer_stall_ms'], 1, ' ms')}")
    print(f"writer's longest stall, raw lvcreate -s:     {fmt(data['raw_lvcreate_writer_stall_ms'], 1, ' ms')}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        guest(args.rounds, args.out)
        return 0
    return host(args.rounds, args.json)


if __name__ == "__main__":
    sys.exit(main())
