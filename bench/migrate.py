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
Not measured yet: a whole migration's downtime (the move to another node is not
built yet).
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
