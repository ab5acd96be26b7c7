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
        return code
    finally:
        step("cleaning up")
        if os.path.ismount(tmpfs):
            subprocess.run(["umount", str(tmpfs)], check=False)
        problems = loops.close()
        for problem in problems:
            print("cleanup problem:", problem, file=sys.stderr)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("make demo needs root (it makes loop devices and freezes them)")
    with tempfile.TemporaryDirectory(prefix="snapcore-demo-") as tmp:
        sys.exit(demo(Path(tmp)))
