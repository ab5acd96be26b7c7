"""Benchmark: the freeze window of fsfreeze + rsync, with and without pre-copy.

Run as root: ``.venv/bin/python bench/migrate.py [--mib 1024] [--change 1]``. A tree
of 1 MiB files (``--mib`` of them) on an ext4 loop filesystem is exported by rsync
to another one, three ways, in one run:

* raw: ``rsync -aHAXS --delete`` of the tree into an up-to-date copy after
  ``--change`` % of its files were rewritten (the delta alone), the same between
  ``fsfreeze -f`` and ``fsfreeze -u`` (what a script would do: the floor of a freeze
  window that copies the delta), and of the whole tree into an empty directory;
* ``snapcore checkpoint`` (fsfreeze + rsync) without pre-copy: the whole tree is
  copied inside the freeze window;
* the same with ``precopy: 3, precopy_until: 1%``: the live tree is copied before
  the freeze, the same ``--change`` % of it is rewritten between the pre-copy and
  the freeze (by an application hook, ``snapcore_before_freeze``), and the final
  pass inside the window moves only that.

Prints the freeze windows (the manifest's ``freeze_window_ms``) and the ratios
against the raw delta (issue 18's target: <= 1.2x) and against each other (>= 10x).

Then the same tree on a btrfs subvolume, exported by btrfs-send after a btrfs
snapshot, without and with ``precopy: true`` (the same change made between the
pre-copy and the snapshot): the export's time after the snapshot (the manifest's
``timings.export``), against a raw ``btrfs send -p A B > FILE`` of the same delta.
Last, a program's **downtime** in a whole move to another node (two nodes on this
machine, :mod:`snapcore.testing.nodes`; B's rsync daemon as the transport): a
counter holding ``--move-mib`` MiB of files on A's ext4 ``/srv/app``, moved

* by snapcore, one command on each side: ``checkpoint --pid P --hand-off 60s --
  criu dump`` on A (fsfreeze + rsync with ``precopy: 3``, CRIU's images sent with
  the export, the tasks frozen until B answers) and ``restore --from EXPORT --wait
  60s --to /srv/app -- criu restore`` on B (the files checked first): from the
  tasks' freeze on A to B's answer once ``criu restore`` returned (the manifest's
  ``handoff.downtime_ms``);
* by hand, the steps a script would run, with a pre-copy too: ``rsync`` of the tree
  to B while the program runs, then ``criu dump``, ``rsync`` of the delta and of the
  images, ``criu restore`` on B: from the dump's start to the restore's end (the
  floor: no check, no hand-off, the program gone from A before B has it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from floor import header, machine_floor, ratio

RSYNC = ["rsync", "-aHAXS", "--numeric-ids", "--delete"]


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


class Loop:
    """A filesystem on a loop device, mounted under ``base``; removed by close. For
    btrfs, ``mount`` is the subvolume ``data``, mounted on its own."""

    def __init__(self, base: Path, name: str, mib: int, fstype: str = "ext4") -> None:
        self.image, self.mount = base / f"{name}.img", base / name
        self.mounts: list[Path] = []
        with open(self.image, "wb") as f:
            f.truncate(mib << 20)
        sh(f"mkfs.{fstype}", "-q", "-f" if fstype == "btrfs" else "-F", str(self.image))
        self.mount.mkdir()
        sh("mount", "-o", "loop", str(self.image), str(self.mount))
        self.mounts.append(self.mount)
        if fstype == "btrfs":
            top, self.mount = self.mount, base / f"{name}-data"
            sh("btrfs", "-q", "subvolume", "create", str(top / "data"))
            self.mount.mkdir()
            device = subprocess.run(
                ["findmnt", "-n", "-o", "SOURCE", str(top)], capture_output=True, text=True, check=True
            ).stdout.strip()
            sh("mount", "-o", "subvol=data", device, str(self.mount))
            self.mounts.append(self.mount)

    def close(self) -> None:
        for where in reversed(self.mounts):
            subprocess.run(["umount", str(where)], check=False, capture_output=True)


def rewrite(root: Path, files: int, share: float, seed: int) -> None:
    """Rewrite ``share`` % of the files (new content, same size)."""
    count = max(1, round(files * share / 100))
    for i in range(count):
        (root / "tree" / f"f{(seed * 7919 + i * 104729) % files}").write_bytes(os.urandom(1 << 20))
    os.sync()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the tree (1 MiB files)")
    parser.add_argument("--change", type=float, default=1.0, help="% of the files rewritten before the freeze")
    parser.add_argument("--move-mib", type=int, default=128, help="size of the moved program's tree (1 MiB files)")
    parser.add_argument("--rounds", type=int, default=3, help="moves of each kind (median)")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("rsync") is None:
        raise SystemExit("run as root, with rsync installed (make setup)")
    print(header(machine_floor()))
    import snapcore

    base = Path(tempfile.mkdtemp(prefix="snapcore-bench-migrate-"))
    loops: list[Loop] = []
    try:
        src = Loop(base, "src", args.mib * 2 + 256)
        out = Loop(base, "out", args.mib * 5 + 512)
        loops += [src, out]
        (src.mount / "tree").mkdir()
        for i in range(args.mib):
            (src.mount / "tree" / f"f{i}").write_bytes(os.urandom(1 << 20))
        os.sync()

        t = time.perf_counter()
        sh(*RSYNC, f"{src.mount}/", f"{out.mount}/raw/")
        raw_full = (time.perf_counter() - t) * 1000
        rewrite(src.mount, args.mib, args.change, seed=1)
        t = time.perf_counter()
        sh(*RSYNC, f"{src.mount}/", f"{out.mount}/raw/")
        raw_delta = (time.perf_counter() - t) * 1000
        # what an admin's script would do: freeze, copy the delta, thaw
        rewrite(src.mount, args.mib, args.change, seed=9)
        t = time.perf_counter()
        sh("fsfreeze", "-f", str(src.mount))
        try:
            sh(*RSYNC, f"{src.mount}/", f"{out.mount}/raw/")
        finally:
            sh("fsfreeze", "-u", str(src.mount))
        raw_frozen_delta = (time.perf_counter() - t) * 1000
        shutil.rmtree(out.mount / "raw")

        from snapcore.testing import BeforeFreeze

        seeds = iter(range(2, 1000))

        def change() -> None:
            """The application writing between the pre-copy and the freeze."""
            rewrite(src.mount, args.mib, args.change, seed=next(seeds))

        windows: dict[str, float] = {}
        finals: dict[str, object] = {}
        sends: dict[str, float] = {}
        for how, extra in (("without", ""), ("with", "        precopy: 3\n        precopy_until: 1%\n")):
            dest = out.mount / f"dest-{how}"
            dest.mkdir()
            policy = base / f"policy-{how}.yaml"
            policy.write_text(
                f"version: 1\nmounts:\n  {src.mount}:\n    imager: fsfreeze\n    exporter: rsync\n"
                f"    freeze_timeout: 10m\n    options:\n      rsync:\n        dest: {dest}\n{extra}"
            )
            plugins = snapcore.make_plugins()
            plugins.pm.register(BeforeFreeze(change), "change")
            manifest = snapcore.checkpoint(policy=policy, state_dir=base / "state", plugins=plugins)
            assert manifest.freeze_window_ms is not None
            windows[how] = manifest.freeze_window_ms
            record = manifest.targets[0]
            finals[how] = (record.export_record or {}).get("details", {}).get("final_pass")
            if record.precopy:
                finals["rounds"] = [(r["round"], r.get("bytes"), r["ms"]) for r in record.precopy]
            shutil.rmtree(dest)

        # btrfs: the same tree on a subvolume, btrfs-send after a snapshot
        src.close()
        loops.remove(src)
        bsrc = Loop(base, "bsrc", args.mib * 3 + 512, fstype="btrfs")
        loops.append(bsrc)
        src = bsrc  # the hook rewrites files there now
        (bsrc.mount / "tree").mkdir()
        for i in range(args.mib):
            (bsrc.mount / "tree" / f"f{i}").write_bytes(os.urandom(1 << 20))
        snaps = bsrc.mounts[0] / "raw"
        snaps.mkdir()
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(bsrc.mount), str(snaps / "a"))
        rewrite(bsrc.mount, args.mib, args.change, seed=3)
        sh("btrfs", "-q", "subvolume", "snapshot", "-r", str(bsrc.mount), str(snaps / "b"))
        t = time.perf_counter()
        with open(out.mount / "raw.btrfs", "wb") as stream:
            subprocess.run(["btrfs", "send", "-q", "-p", str(snaps / "a"), str(snaps / "b")], stdout=stream, check=True)
            os.fsync(stream.fileno())
        sends["raw"] = (time.perf_counter() - t) * 1000
        (out.mount / "raw.btrfs").unlink()
        for how, extra in (("without", ""), ("with", ", precopy: true")):
            dest = out.mount / f"streams-{how}"
            policy = base / f"policy-btrfs-{how}.yaml"
            policy.write_text(
                f"version: 1\nmounts:\n  {bsrc.mount}:\n    imager: btrfs\n    exporter: btrfs-send\n"
                f"    options:\n      btrfs-send: {{dest: {dest}{extra}}}\n"
            )
            plugins = snapcore.make_plugins()
            plugins.pm.register(BeforeFreeze(change), "change")
            manifest = snapcore.checkpoint(policy=policy, state_dir=base / "state", plugins=plugins)
            record = manifest.targets[0]
            sends[how] = record.timings["export"]
            if record.precopy:
                finals["btrfs_precopy"] = record.precopy[0]
            shutil.rmtree(dest)
    finally:
        for loop in reversed(loops):
            loop.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"a tree of {args.mib} x 1 MiB files, {args.change:g} % rewritten before the freeze (ms):")
    print(f"  raw rsync, the whole tree into an empty directory  {raw_full:10.1f}")
    print(f"  raw rsync, the delta into an up-to-date copy       {raw_delta:10.1f}")
    print(f"  freeze window, fsfreeze + rsync, no pre-copy       {windows['without']:10.1f}")
    print(f"  freeze window, fsfreeze + rsync, pre-copy          {windows['with']:10.1f}")
    print(f"  pre-copy rounds (round, bytes, ms): {finals.get('rounds')}; final pass: {finals.get('with')}")
    print(f"  raw fsfreeze -f, rsync of the delta, fsfreeze -u   {raw_frozen_delta:10.1f}")
    print(f"  window with pre-copy / raw delta:        {ratio(windows['with'], raw_delta)} (target <= 1.2x)")
    print(f"  window with pre-copy / raw freeze+delta: {ratio(windows['with'], raw_frozen_delta)}")
    print(f"  window without / with pre-copy:          {windows['without'] / windows['with']:.1f}x (target >= 10x)")
    print("btrfs-send after a btrfs snapshot, the same change (ms):")
    print(f"  raw btrfs send -p A B > FILE (the delta)           {sends['raw']:10.1f}")
    print(f"  export, no pre-copy (a full stream)                {sends['without']:10.1f}")
    print(f"  export, pre-copy (incremental against it)          {sends['with']:10.1f}")
    print(f"  pre-copy: {finals.get('btrfs_precopy')}")
    print(f"  export with pre-copy / raw delta:        {ratio(sends['with'], sends['raw'])} (target <= 1.2x)")
    print(f"  export without / with pre-copy:          {sends['without'] / sends['with']:.1f}x (target >= 10x)")
    moves = move_downtimes(args.move_mib, args.rounds)
    print(f"a program holding {args.move_mib} x 1 MiB files moved A -> B, downtime (ms, median of {args.rounds}):")
    print(f"  by hand: rsync, criu dump, rsync delta + images, criu restore  {moves['raw']:10.1f}")
    print(f"  snapcore checkpoint --hand-off / restore --from --wait          {moves['snapcore']:10.1f}")
    print(
        f"    on A: freeze window {moves['window']:.1f}, criu dump {moves['dumped']:.1f}, "
        f"images sent {moves['sent']:.1f}"
    )
    print(f"  snapcore / by hand:                      {ratio(moves['snapcore'], moves['raw'])}")
    return 0


COUNTER = """
import os, time
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.close(null)
os.chdir("/srv/app")  # what it uses: the mount it is checkpointed with
i = 0
while True:
    i += 1
    with open("/srv/app/count.new", "w") as f:
        f.write(f"{i}\\n")
    os.rename("/srv/app/count.new", "/srv/app/count")
    time.sleep(0.05)
"""


def move_downtimes(mib: int, rounds: int) -> dict[str, float]:
    """Medians, ms: the ``raw`` (by hand) and ``snapcore`` downtimes, and parts of
    snapcore's on A (``window``: the filesystem frozen, the final rsync pass in it;
    ``dumped``: the ``criu dump``; ``sent``: the images copied)."""
    import json
    import statistics

    from snapcore.tasks.criu import check_criu
    from snapcore.testing.nodes import APP, Nodes, rsync_daemon

    criu = check_criu().path
    found: dict[str, list[float]] = {"raw": [], "snapcore": [], "window": [], "dumped": [], "sent": []}
    for n in range(rounds):
        for how in ("raw", "snapcore"):
            base = Path(tempfile.mkdtemp(prefix=f"snapcore-bench-move-{how}-"))
            nodes = Nodes(base, size_mb=mib * 3 + 256)
            daemon = program = None
            try:
                a, b = nodes.a, nodes.b
                exports, images_a = base / "exports", base / "images-A"
                exports.mkdir()
                images_a.mkdir()
                daemon = rsync_daemon(b, {"exports": exports, "app": Path(APP)}, base)
                fill = f"mkdir {APP}/tree && for i in $(seq {mib}); do head -c 1M /dev/urandom > {APP}/tree/f$i; done"
                a.run("sh", "-c", fill)
                program = a.start(sys.executable, "-c", COUNTER)
                while a.run("cat", f"{APP}/count", check=False).returncode != 0:
                    time.sleep(0.02)
                pid = str(program.node_pid)
                remote = f"rsync://{b.address}:8730"
                if how == "raw":
                    a.run(*RSYNC, f"{APP}/", f"{remote}/app/")  # the pre-copy, while it runs
                    t = time.time()
                    a.run(criu, "dump", "-t", pid, "-D", str(images_a), "-o", "dump.log")
                    a.run(*RSYNC, f"{APP}/", f"{remote}/app/")
                    a.run(*RSYNC, f"{images_a}/", f"{remote}/exports/images/")
                    restore = [criu, "restore", "-D", str(exports / "images"), "-d", "--manage-cgroups=ignore"]
                    b.run(*restore, "-o", "restore.log")
                    found["raw"].append((time.time() - t) * 1000)
                    continue
                policy = base / "policy.yaml"
                policy.write_text(
                    f"version: 1\nmounts:\n  {APP}:\n    imager: fsfreeze\n    exporter: rsync\n"
                    f"    options:\n      rsync:\n        dest: {remote}/exports\n        precopy: 3\n"
                )
                snap = [sys.executable, "-m", "snapcore", "--run-dir", str(base / "run")]
                on_a = subprocess.Popen(
                    a.argv(
                        *snap, "--state-dir", str(base / "state-A"), "checkpoint", "--policy", str(policy),
                        "--pid", pid, "--id", f"move{n}", "--hand-off", "60s", "--",
                        criu, "dump", "-t", pid, "-D", str(images_a), "-o", "dump.log",
                    ),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )  # fmt: skip
                on_b = b.run(
                    *snap, "--state-dir", str(base / "state-B"), "restore", "--from", str(exports / f"move{n}"),
                    "--wait", "60s", "--to", APP, "--", criu, "restore", "-d", "--manage-cgroups=ignore",
                    "-o", str(base / "restore.log"), check=False,
                )  # fmt: skip
                out, err = on_a.communicate(timeout=120)
                if on_a.returncode != 0 or on_b.returncode != 0:
                    raise SystemExit(f"the move failed: A: {out}{err}\nB: {on_b.stdout}{on_b.stderr}")
                path = base / "state-A" / "checkpoints" / f"move{n}" / "manifest.json"
                manifest = json.loads(a.run("cat", str(path)).stdout)
                found["snapcore"].append(manifest["handoff"]["downtime_ms"])
                found["dumped"].append(manifest["timings"].get("payload", 0.0))
                found["sent"].append(manifest["timings"].get("send_images", 0.0))
                found["window"].append(manifest["freeze_window_ms"])
            finally:
                for process in (program, daemon):
                    if process is not None:
                        process.kill()
                        process.wait()
                problems = nodes.close()
                shutil.rmtree(base, ignore_errors=True)
                if problems:
                    raise SystemExit(f"teardown: {problems}")
    return {k: statistics.median(v) for k, v in found.items()}


if __name__ == "__main__":
    sys.exit(main())
