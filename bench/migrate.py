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
Not measured yet: btrfs send (no pre-copy there yet) and a whole migration's
downtime (the move to another node is not built yet).
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
    """An ext4 filesystem on a loop device, mounted under ``base``; removed by close."""

    def __init__(self, base: Path, name: str, mib: int) -> None:
        self.image, self.mount = base / f"{name}.img", base / name
        with open(self.image, "wb") as f:
            f.truncate(mib << 20)
        sh("mkfs.ext4", "-q", "-F", str(self.image))
        self.mount.mkdir()
        sh("mount", "-o", "loop", str(self.image), str(self.mount))

    def close(self) -> None:
        subprocess.run(["umount", str(self.mount)], check=False, capture_output=True)


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

        class Change:
            """The application writing between the pre-copy and the freeze."""

            seed = 2

            @snapcore.hookimpl
            def snapcore_before_freeze(self, checkpoint: snapcore.Checkpoint) -> None:
                rewrite(src.mount, args.mib, args.change, seed=Change.seed)
                Change.seed += 1

        windows: dict[str, float] = {}
        finals: dict[str, object] = {}
        for how, extra in (("without", ""), ("with", "        precopy: 3\n        precopy_until: 1%\n")):
            dest = out.mount / f"dest-{how}"
            dest.mkdir()
            policy = base / f"policy-{how}.yaml"
            policy.write_text(
                f"version: 1\nmounts:\n  {src.mount}:\n    imager: fsfreeze\n    exporter: rsync\n"
                f"    freeze_timeout: 10m\n    options:\n      rsync:\n        dest: {dest}\n{extra}"
            )
            plugins = snapcore.make_plugins()
            plugins.pm.register(Change(), "change")
            manifest = snapcore.checkpoint(policy=policy, state_dir=base / "state", plugins=plugins)
            assert manifest.freeze_window_ms is not None
            windows[how] = manifest.freeze_window_ms
            record = manifest.targets[0]
            finals[how] = (record.export_record or {}).get("details", {}).get("final_pass")
            if record.precopy:
                finals["rounds"] = [(r["round"], r.get("bytes"), r["ms"]) for r in record.precopy]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
