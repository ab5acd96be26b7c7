"""The rsync exporter's pre-copy (``precopy: N``): rounds of rsync of the live tree
before the freeze, then a final pass inside the window that moves only what changed
since; on real loop filesystems, with the real rsync.

What changes between the pre-copy and the freeze is made by an application hook
(``snapcore_before_freeze``, a plugin registered by the test), so that the final
pass has something exact to carry: a file modified, one deleted, one added, a
directory renamed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tar_helpers import MiB, exporter_policy, make_every_kind

import snapcore
from snapcore import main, make_plugins
from snapcore.testing import (
    BeforeFreeze,
    LoopFactory,
    assert_not_frozen,
    assert_same_tree,
    describe_tree,
    machine_pace,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems and device nodes need root")


def change_after_the_precopy(root: Path) -> Any:
    """What the application does between the pre-copy and the freeze; the tree then."""
    (root / "small.txt").write_text("changed after the pre-copy\n")
    (root / "bulk" / "f3").unlink()
    (root / "new-file").write_bytes(os.urandom(3000))
    (root / "dir" / "sub").rename(root / "dir" / "moved")
    return describe_tree(root, metadata=True)


def _source(loop_fs: LoopFactory) -> Path:
    src = loop_fs("ext4", size_mb=96)
    make_every_kind(src.mount_point)
    (src.mount_point / "bulk").mkdir()
    for i in range(16):
        (src.mount_point / "bulk" / f"f{i}").write_bytes(os.urandom(MiB))
    return src.mount_point


def test_precopy_then_a_final_pass_that_moves_only_the_changes(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path
) -> None:
    src = _source(loop_fs)
    out = loop_fs("ext4", size_mb=128)
    dest = out.mount_point / "trees"
    dest.mkdir()
    policy = exporter_policy(
        tmp_path, src, "rsync", {"dest": str(dest), "precopy": 3, "precopy_until": "1%"}, name="precopy"
    )
    plugins = make_plugins()
    change = BeforeFreeze(lambda: change_after_the_precopy(src))
    plugins.pm.register(change, "change-before-the-freeze")
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="p1", plugins=plugins)
    assert_not_frozen(src)
    record = manifest.targets[0]
    assert record.outcome == "ok", record.error
    rounds = record.precopy
    assert rounds and rounds[0]["round"] == 1 and rounds[0]["bytes"] >= 16 * MiB, rounds
    assert 2 <= len(rounds) <= 3 and rounds[-1]["bytes"] <= rounds[-1]["total_bytes"] // 100, rounds  # idle: stopped
    assert "precopy" in record.timings and record.consistency == "fs-frozen"
    assert record.export_record is not None
    final = record.export_record["details"]["final_pass"]
    # inside the window: the changed file, the new one and the renamed directory's
    # file (rsync sees a rename as new files), not the tree
    assert 0 < final["bytes"] < 64 * 1024 and final["files"] == 3, final
    name = record.export_record["details"]["slug"]
    tree = dest / "p1" / name
    assert not (tree / "bulk" / "f3").exists() and not (tree / "dir" / "sub").exists()  # --delete
    assert main(["--state-dir", str(state_dir), "verify", "p1"]) == 0
    restored = out.mount_point / "restored"
    assert main(["restore", "--from", str(dest / "p1"), "--to", str(restored)]) == 0
    assert_same_tree(restored, change.result)

    # the next checkpoint pre-copies against this one (--link-dest): round 1 links
    # what did not change instead of copying it
    plugins.pm.unregister(name="change-before-the-freeze")
    again = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="p2", plugins=plugins)
    first = again.targets[0].precopy
    assert first and first[0]["bytes"] < first[0]["total_bytes"] // 100, first
    assert (dest / "p1" / name / "bulk" / "f0").stat().st_ino == (dest / "p2" / name / "bulk" / "f0").stat().st_ino


def _cli(state_dir: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **({"SNAPCORE_FAULT": fault} if fault else {}))
    return subprocess.run(
        [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=machine_pace().seconds(120),
    )


def test_a_checkpoint_that_fails_after_its_precopy_leaves_no_tree(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path
) -> None:
    """A fault at the freeze (a fake of a failure there): the pre-copied tree goes,
    and so does the export directory it was made in; exit 1, the manifest says so."""
    src = _source(loop_fs)
    dest = tmp_path / "trees"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src, "rsync", {"dest": str(dest), "precopy": 2}, name="precopy")
    done = _cli(state_dir, "checkpoint", "--policy", str(policy), "--id", "f1", fault="freeze=raise")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (dest / "f1").exists(), sorted(p.name for p in dest.rglob("*"))[:20]
    shown = _cli(state_dir, "show", "f1", "--json")
    assert '"outcome": "failed"' in shown.stdout and '"precopy": [' in shown.stdout
    assert_not_frozen(src)


def test_a_controller_killed_after_its_precopy_is_cleaned_up_by_recover(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL at the freeze (fault injection), after the pre-copy wrote its tree:
    ``snapcore recover`` removes the unfinished tree (the pre-copy left the same
    journal intent as an export)."""
    src = _source(loop_fs)
    dest = tmp_path / "trees"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src, "rsync", {"dest": str(dest), "precopy": 1}, name="precopy")
    done = _cli(state_dir, "checkpoint", "--policy", str(policy), "--id", "k1", fault="freeze=kill")
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert any(dest.glob("k1/.*.part")), "the pre-copy wrote nothing to clean up"
    recovered = _cli(state_dir, "recover")
    assert recovered.returncode == 0 and "Traceback" not in recovered.stderr, recovered.stderr
    assert "removed the unfinished export" in recovered.stdout, recovered.stdout
    assert not (dest / "k1").exists()
    assert_not_frozen(src)
    shutil.rmtree(dest)
