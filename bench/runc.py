"""Benchmark: how much longer a runc container stands still because of snapcore.

Run as root: ``.venv/bin/python bench/runc.py [--rounds N] [--rootfs-mib M]``. A busybox
container on a btrfs subvolume (mounted on its own, on a loop device this script
makes and removes) with M MiB of files in its rootfs is checkpointed and restored
with runc, alternating round by round:

* checkpoint: ``runc checkpoint`` without an action script, against the same with
  snapcore's hook (``criu-hook --write-script``) in the CRIU config runc hands CRIU;
  the container is stopped for all of it, the hook's post-dump included;
* restore: ``runc restore`` alone, against ``snapcore restore ID --in-place -- runc
  restore`` (the files rolled back first; the hook then sees them in place).

Prints medians of the wall times and the ratios (issue 17's target: <= 1.2x);
``bench/criu_hook.py`` measures the hook's cost per ignored action.
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

    def runc_do(self, *args: str) -> float:
        t = time.perf_counter()
        subprocess.run([*self.runc, *args], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return (time.perf_counter() - t) * 1000

    def round(self, with_snapcore: bool) -> tuple[float, float]:
        """One checkpoint and one restore: their wall times."""
        self.n += 1
        cid, images = f"b{self.n}", self.base / f"images-{self.n}"
        self.conf.write_text(f"action-script {self.hook}\n" if with_snapcore else "")
        self.runc_do("run", "-d", "--bundle", str(self.bundle), cid)
        time.sleep(0.3)
        dump = self.runc_do("checkpoint", "--image-path", str(images), "--work-path", str(images), cid)
        restore_args = ["restore", "-d", "--bundle", str(self.bundle), "--image-path", str(images)]
        restore_args += ["--work-path", str(images / "r"), cid]
        if with_snapcore:
            checkpoint_id = (images / "snapcore-checkpoint").read_text().split()[0]
            t = time.perf_counter()
            argv = [*self.snapcore, "restore", checkpoint_id, "--in-place", "--", *self.runc, *restore_args]
            subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            restore = (time.perf_counter() - t) * 1000
        else:
            restore = self.runc_do(*restore_args)
        subprocess.run([*self.runc, "delete", "-f", cid], check=False, capture_output=True)
        shutil.rmtree(images, ignore_errors=True)
        return dump, restore

    def close(self) -> None:
        for where in (self.rootfs, self.top):
            subprocess.run(["umount", "-R", str(where)], check=False, capture_output=True)


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
    times: dict[str, list[float]] = {"dump": [], "dump+": [], "restore": [], "restore+": []}
    try:
        bench.round(False)  # warm-up: page cache, runc and CRIU binaries
        for _ in range(args.rounds):
            d, r = bench.round(False)
            times["dump"].append(d)
            times["restore"].append(r)
            d, r = bench.round(True)
            times["dump+"].append(d)
            times["restore+"].append(r)
    finally:
        bench.close()
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"runc container, {args.rootfs_mib} MiB rootfs on a btrfs subvolume, median of {args.rounds} rounds:")
    print(f"  runc checkpoint            {med['dump']:8.1f} ms   with snapcore's hook {med['dump+']:8.1f} ms")
    print(f"  runc restore               {med['restore']:8.1f} ms   after snapcore restore {med['restore+']:8.1f} ms")
    print(f"  checkpoint: with / without {ratio(med['dump+'], med['dump'])} (target <= 1.2x)")
    print(f"  restore:    with / without {ratio(med['restore+'], med['restore'])} (target <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
