"""`make demo`: loop filesystems in a temporary directory, the plan, a checkpoint, the manifest.

Everything is made here and removed at the end, whatever happens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from snapcore.cli import main
from snapcore.testing import LoopFactory

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # crcycle, the checkpoint/restore cycle the soak test runs too


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*args: str) -> int:
    print("$ snapcore " + " ".join(args), flush=True)
    code = main(list(args))
    sys.stdout.flush()
    return code


def demo(base: Path) -> int:
    # the journal and the locks live with the demo's filesystems, and go with them
    # (a real host keeps them in /run/snapcore)
    os.environ["SNAPCORE_RUN_DIR"] = str(base / "run")
    loops = LoopFactory(base)
    tmpfs = base / "tmpfs"
    try:
        step("making demo filesystems (loop devices) under " + str(base))
        ext4, xfs, btrfs, backup = loops("ext4"), loops("xfs"), loops("btrfs"), loops("ext4", size_mb=64)
        for sub in ("tar", "rsync"):
            (backup.mount_point / sub).mkdir()
        tmpfs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "demo-tmpfs", str(tmpfs)], check=True)
        for fs in (ext4, xfs, btrfs):
            fs.write("app/data.txt", f"demo data on {fs.fstype}\n")
        policy = base / "policy.yaml"
        text = (HERE / "policy.yaml.in").read_text()
        places = {"@EXT4@": ext4, "@XFS@": xfs, "@BTRFS@": btrfs, "@TMPFS@": tmpfs, "@BACKUP@": backup}
        for key, value in places.items():
            text = text.replace(key, str(value))
        policy.write_text(text)
        state = base / "state"
        print(policy.read_text())

        step("installed backends")
        run("backends")
        step("policy check")
        run("policy", "check", str(policy))
        step("plan (touches nothing)")
        run("--state-dir", str(state), "plan", "--policy", str(policy))
        step("checkpoint, with a command that runs once every image is made")
        code = run(
            "--state-dir",
            str(state),
            "checkpoint",
            "--policy",
            str(policy),
            "--id",
            "demo",
            "--",
            "sh",
            "-c",
            'echo "payload sees checkpoint $SNAPCORE_CHECKPOINT_ID"',
        )
        step("list")
        run("--state-dir", str(state), "list")
        step("verify: every image and export still there and intact")
        run("--state-dir", str(state), "verify", "demo")
        step("restore the ext4 mount's tar export into a new directory")
        (ext4.mount_point / "app" / "data.txt").write_text("changed after the checkpoint\n")
        restored = base / "restored"
        run("--state-dir", str(state), "restore", "demo", "--mount", str(ext4), "--to", str(restored))
        print("restored app/data.txt:", (restored / "app" / "data.txt").read_text().strip())
        step("the manifest's summary")
        run("--state-dir", str(state), "show", "demo")
        print(f"\n(the whole manifest: {state}/checkpoints/demo/manifest.json)")
        return code or program_demo(base, loops, state)
    finally:
        step("cleaning up")
        if os.path.ismount(tmpfs):
            subprocess.run(["umount", str(tmpfs)], check=False)
        problems = loops.close()
        for problem in problems:
            print("cleanup problem:", problem, file=sys.stderr)


def program_demo(base: Path, loops: LoopFactory, state: Path) -> int:
    """snapcore's reason to exist: a running SQLite program checkpointed with CRIU,
    its files damaged, restored, and seen going on from the checkpoint."""
    import json

    from crcycle import App, cycle

    from snapcore.errors import CriuUnavailable
    from snapcore.tasks.criu import check_criu

    step("a running program: checkpoint with CRIU, damage its files, restore")
    try:
        criu = check_criu()
    except CriuUnavailable as exc:
        print(f"skipped: {exc}")
        return 1
    mnt = loops("btrfs").mount_subvolume("app", base / "app")
    scratch = base / "program"
    scratch.mkdir()
    app = App(workdir=mnt, scratch=scratch, criu=criu.path, state_dir=state, run=lambda argv: run(*argv))
    print(f"{APP_NAME} in {mnt} (btrfs, mounted subvol=app): SQLite in WAL mode, ~45 commits/s,")
    print("config.json held open and re-read, app.log open for append, a deleted scratch file")
    app.start(60)
    try:
        app.wait_rows(20, 60)
        print(f"running as pid {app.pid}; {len(app.logged_rows())} rows so far")
        seen = cycle(app, "program", timeout=60, say=print)
        manifest = json.loads((state / "checkpoints" / "program" / "manifest.json").read_text())
        print(f"\nwhat the inventory found the program using on {mnt}:")
        elsewhere = 0
        for f in manifest["files"]:
            if f["mount"] != str(mnt):
                elsewhere += 1
                continue
            ghost = " (deleted: its content saved as a ghost copy)" if f.get("ghost") else ""
            print(f"  {f['state']:<8} {f['path']}{ghost}")
        print(f"  and {elsewhere} files elsewhere (the interpreter, libraries: not checkpointed)")
        print(
            f"the program stood still {manifest['tasks'].get('stopped_ms', 0):.0f} ms; the filesystems were "
            f"frozen {manifest['freeze_window_ms']:.1f} ms; image: {manifest['targets'][0]['consistency']}"
        )
        restored = sorted(p.name for p in mnt.iterdir() if not p.name.startswith("."))
        print(f"what the restore put back in {mnt}: {', '.join(restored)}")
        print(
            f"rows: {len(seen.rows_at_checkpoint)} at the checkpoint, {len(seen.rows_after)} now, numbered 1.."
            f"{seen.rows_after[-1]} with no gap or repeat: {'yes' if not seen.problems() else seen.problems()}"
        )
        bad = app.bad_reads.read_text() if app.bad_reads.exists() else ""
        print("the program read a damaged file: " + (bad or "never"))
        return 1 if seen.problems() or bad else 0
    finally:
        app.stop()


APP_NAME = "examples/sqlite_app.py"


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("make demo needs root (it makes loop devices and freezes them)")
    with tempfile.TemporaryDirectory(prefix="snapcore-demo-") as tmp:
        sys.exit(demo(Path(tmp)))
