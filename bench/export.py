"""Benchmark: snapcore's tar and rsync exporters against the raw tools (issue 5).

On a tree of 20k x 16 KiB files (a loop ext4 made here, exported to another loop
ext4, warm page cache), in one run:

* raw GNU tar (``tar -cf``, and with the same preserving flags snapcore passes)
  vs snapcore's tar export (``snapcore_tar.tar_export.export``, what runs inside
  the freeze window with fsfreeze), and Python's ``tarfile`` for scale;
* raw ``rsync -a --link-dest`` (and with snapcore's flags) with 1 % of the files
  changed vs snapcore's incremental rsync export linking to the same base tree.

Each figure is the median of ``--runs`` timed runs, raw and snapcore interleaved;
raw tar writes into a fresh directory per run, as snapcore does (``DEST/ID/``).
What snapcore does after the thaw (checksum, file list, syncfs, manifest copy) is
timed apart: it is outside the freeze window and the raw tools do none of it.
Target: snapcore ≥ 0.95x the raw tool with the same flags. Needs root (loop
devices). Run: ``.venv/bin/python bench/export.py [--files 20000] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from floor import header, machine_floor, ratio

from snapcore import Consistency, Export, Image, Target
from snapcore.host.mounts import MountTable
from snapcore.testing import LoopFactory
from snapcore_tar import rsync_dest, rsync_export, tar_export, tar_format
from snapcore_tar.common import slug

MiB = 1 << 20
MANIFEST = '{{"id": "{}", "outcome": "ok"}}\n'


def _finish(module: Any, target: Any, export: Any, manifest_text: str) -> None:
    """What the core does after the thaw: the ``finish`` hook, then ``checkpoint_end``."""
    module.finish(target, export)
    module.publish(target, export, manifest_text)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_tree(root: Path, files: int, size: int) -> int:
    per_dir = 100
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir()
        (d / f"f{i % per_dir:03d}").write_bytes(os.urandom(size))
    subprocess.run(["sync"], check=True)
    return files * size


def change_some(root: Path, files: int, size: int, fraction: float) -> int:
    every = max(1, round(1 / fraction))
    changed = 0
    for i in range(0, files, every):
        (root / f"d{i // 100:04d}" / f"f{i % 100:03d}").write_bytes(os.urandom(size))
        changed += 1
    return changed


def target_for(src: Path, dest: Path, exporter: str, cid: str, state: Path) -> Target:
    mount = MountTable.read().find(src)
    every: dict[str, dict[str, object]] = {
        "tar": {"dest": str(dest), "compress": "none", "incremental": False, "full_every": 0},
        "rsync": {"dest": str(dest), "rsh": None, "password_file": None, "timeout": 30.0},
    }
    options = every[exporter]
    return Target(
        checkpoint_id=cid,
        mount=mount,
        imager="fsfreeze",
        exporter=exporter,
        options=MappingProxyType({exporter: MappingProxyType(options)}),
        state_dir=state,
    )


def image_of(src: Path) -> Image:
    return Image(backend="fsfreeze", ref=None, consistency=Consistency.FS_FROZEN, path=str(src), live=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(label: str, seconds: float, nbytes: int, base: float | None = None) -> None:
    """With ``base`` (the raw tool's seconds): raw / this, and this minus raw in ms."""
    rate = nbytes / MiB / seconds
    vs = f"   {ratio(seconds * 1000, base * 1000, inverted=True, unit='x raw')}" if base else ""
    print(f"  {label:<44} {seconds * 1000:8.1f} ms  {rate:8.1f} MiB/s{vs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=16 * 1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--changed", type=float, default=0.01, help="fraction changed before the rsync runs")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/export.py needs root (loop filesystems)", file=sys.stderr)
        return 2
    print(header(machine_floor()), flush=True)
    os.environ["SNAPCORE_PROGRESS"] = "never"  # measure the copy, not the terminal
    tar = shutil.which("tar") or "tar"
    rsync = shutil.which("rsync") or "rsync"
    total = args.files * args.size
    image_mb = max(256, total * 2 // MiB + 128)
    with tempfile.TemporaryDirectory(prefix="snapcore-bench-") as tmp:
        loops = LoopFactory(Path(tmp))
        try:
            src_fs = loops("ext4", size_mb=image_mb, mkfs_args=("-N", str(args.files * 2 + 1000)))
            out_fs = loops("ext4", size_mb=image_mb * 4)
            src = src_fs.mount_point
            dest = out_fs.mount_point / "exports"
            dest.mkdir()
            state = Path(tmp) / "state"
            state.mkdir()
            print(
                f"tree: {args.files} files x {args.size // 1024} KiB = {total / MiB:.0f} MiB; "
                f"{args.runs} runs each, median; warm cache"
            )
            make_tree(src, args.files, args.size)
            name = slug(str(src))
            flags = list(tar_format.CREATE_FLAGS)

            # -- tar -----------------------------------------------------------------
            raw_plain: list[float] = []
            raw_flags: list[float] = []
            ours: list[float] = []
            after: list[float] = []
            py: list[float] = []

            def raw(extra: list[str]) -> float:
                # into a fresh directory, as snapcore's DEST/ID/: on ext4 that alone
                # costs ~12 % against writing beside earlier files
                where = dest / "raw"
                where.mkdir()
                out = where / "raw.tar"
                t = timed(lambda: subprocess.run([tar, "-cf", str(out), *extra, "-C", str(src), "."], check=True))
                shutil.rmtree(where)
                return t

            def snap(i: int) -> float:
                cid = f"tar-{i}"
                target = target_for(src, dest, "tar", cid, state)
                export: list[Export] = []
                t = timed(lambda: export.append(tar_export.export(target, image_of(src), dest)))
                after.append(timed(lambda: _finish(tar_export, target, export[0], MANIFEST.format(cid))))
                tar_export.discard(target, export[0])
                return t

            def pytar() -> float:
                out = dest / "py.tar"

                def run() -> None:
                    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as t:
                        t.add(str(src), arcname=".")

                t = timed(run)
                out.unlink()
                return t

            raw([]), snap(-1), pytar()  # warm the cache and the code paths
            for i in range(args.runs):
                raw_plain.append(raw([]))
                raw_flags.append(raw(flags))
                ours.append(snap(i))
            for _ in range(max(1, args.runs // 2)):
                py.append(pytar())
            print("tar (archive of the whole tree):")
            report("raw GNU tar -cf", median(raw_plain), total)
            report("raw GNU tar -cf + snapcore's flags", median(raw_flags), total)
            report("snapcore tar export (vs same flags)", median(ours), total, median(raw_flags))
            report("snapcore tar export (vs plain tar -cf)", median(ours), total, median(raw_plain))
            report("Python tarfile", median(py), total, median(raw_plain))
            report("(after the thaw: sha256 + syncfs + manifest)", median(after), total)

            # -- rsync ----------------------------------------------------------------
            base = target_for(src, dest, "rsync", "base", state)
            base_export = rsync_export.export(base, image_of(src))
            _finish(rsync_export, base, base_export, MANIFEST.format("base"))
            changed = change_some(src, args.files, args.size, args.changed)
            subprocess.run(["sync"], check=True)
            link = f"--link-dest=../../base/{name}"
            raw_a: list[float] = []
            raw_same: list[float] = []
            ours_r: list[float] = []
            after_r: list[float] = []

            def raw_rsync(i: int, extra: list[str]) -> float:
                out = dest / f"raw-{i}" / name
                out.parent.mkdir()
                t = timed(lambda: subprocess.run([rsync, *extra, link, f"{src}/", f"{out}/"], check=True))
                shutil.rmtree(out.parent)
                return t

            def snap_rsync(i: int) -> float:
                target = target_for(src, dest, "rsync", f"inc-{i}", state)
                export: list[Export] = []
                t = timed(lambda: export.append(rsync_export.export(target, image_of(src))))
                assert export[0].details["link_dest"] == "base"
                after_r.append(
                    timed(lambda: _finish(rsync_export, target, export[0], MANIFEST.format(target.checkpoint_id)))
                )
                (dest / f"{name}.latest").write_text("base\n")  # the next run links to base again
                rsync_export.discard(target, export[0])
                return t

            same = [*rsync_dest.COPY_FLAGS, "--one-file-system"]
            raw_rsync(-1, ["-a"]), snap_rsync(-1)
            for i in range(args.runs):
                raw_a.append(raw_rsync(i, ["-a"]))
                raw_same.append(raw_rsync(i, same))
                ours_r.append(snap_rsync(i))
            print(f"rsync --link-dest to the previous tree, {changed} files ({args.changed:.0%}) changed:")
            report("raw rsync -a --link-dest", median(raw_a), total)
            report("raw rsync --link-dest + snapcore's flags", median(raw_same), total)
            report("snapcore rsync export (vs same flags)", median(ours_r), total, median(raw_same))
            report("snapcore rsync export (vs plain rsync -a)", median(ours_r), total, median(raw_a))
            report("(after the thaw: file list + syncfs + manifest)", median(after_r), total)
        finally:
            problems = loops.close()
            if problems:
                print("teardown: " + "; ".join(problems), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
