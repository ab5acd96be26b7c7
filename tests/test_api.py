"""The Python API: every command is a typed call (the command line only parses, calls
and prints). The restores and exports behind them are tested with real images by the
plugins' own tests (the core's tests have fsfreeze alone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import snapcore
from snapcore import CheckpointFailed, PolicyError, UsageError
from snapcore.testing import LoopFactory, assert_not_frozen
from snapcore.testing.processes import Holders

pytestmark = pytest.mark.usefixtures("root_only")


def test_checkpoint_of_a_process_tree(loop_fs: LoopFactory, state_dir: Path, holder: Holders) -> None:
    """``checkpoint(pid=...)`` is ``checkpoint --pid``: the mounts the tasks use become
    the targets, their files are inventoried, and they are thawed after."""
    fs = loop_fs("ext4")
    fs.write("data.txt", b"original\n")
    pid = holder(f"w:{fs.mount_point / 'data.txt'}")
    manifest = snapcore.checkpoint(pid=pid, checkpoint_id="p1", state_dir=state_dir)
    assert manifest.outcome == "ok" and [t.mount for t in manifest.targets] == [str(fs.mount_point)]
    assert manifest.tasks is not None and pid in manifest.tasks["pids"]
    assert str(fs.mount_point / "data.txt") in {f["path"] for f in manifest.files or []}
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] in "SR", "the task was not thawed"
    assert_not_frozen(fs.mount_point)


def test_tasks_are_named_once(state_dir: Path) -> None:
    with pytest.raises(UsageError, match="name the tasks once"):
        snapcore.checkpoint(pid=1, cgroup="/sys/fs/cgroup", state_dir=state_dir)


def test_list_show_verify_prune_delete(loop_fs: LoopFactory, state_dir: Path, run_dir: Path) -> None:
    fs = loop_fs("xfs")
    for cid in ("a1", "a2"):
        snapcore.checkpoint([fs.mount_point], checkpoint_id=cid, state_dir=state_dir)
    with pytest.raises(CheckpointFailed):
        snapcore.checkpoint([fs.mount_point], checkpoint_id="a3", state_dir=state_dir, payload=["false"])
    listed = snapcore.list_checkpoints(state_dir=state_dir)
    assert [(x.id, x.manifest.outcome if x.manifest else None) for x in listed] == [
        ("a3", "failed"),
        ("a2", "ok"),
        ("a1", "ok"),
    ]
    (state_dir / "checkpoints" / "bad").mkdir()
    (state_dir / "checkpoints" / "bad" / "manifest.json").write_text("{not json")
    bad = next(x for x in snapcore.list_checkpoints(state_dir=state_dir) if x.id == "bad")
    assert bad.manifest is None and bad.error
    assert snapcore.show("a2", state_dir=state_dir).targets[0].mount == str(fs.mount_point)
    found = snapcore.verify("a2", state_dir=state_dir)
    assert found.ok and found.checkpoint_id == "a2" and list(found.mounts) == [str(fs.mount_point)]
    with pytest.raises(UsageError, match="give a checkpoint ID or --from"):
        snapcore.verify(state_dir=state_dir)
    assert snapcore.prune(dry_run=True, state_dir=state_dir, run_dir=run_dir).errors == []
    done = snapcore.delete(["a1", "a3"], state_dir=state_dir, run_dir=run_dir)
    assert [(d.manifest.id, d.manifest_removed, d.errors) for d in done] == [("a1", True, []), ("a3", True, [])]
    assert sorted(x.id for x in snapcore.list_checkpoints(state_dir=state_dir)) == ["a2", "bad"]
    assert snapcore.recover(run_dir=run_dir) == []
    assert_not_frozen(fs.mount_point)


def test_restore_needs_an_image_and_a_place(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    fs = loop_fs("ext4")
    snapcore.checkpoint([fs.mount_point], checkpoint_id="r1", state_dir=state_dir)
    with pytest.raises(UsageError, match="say where to restore"):
        snapcore.restore("r1", state_dir=state_dir)
    with pytest.raises(UsageError, match="--safe restores a copy"):
        snapcore.restore("r1", in_place=True, safe=True, state_dir=state_dir)
    with pytest.raises(snapcore.PluginError, match="'fsfreeze' cannot restore"):  # it keeps no image
        snapcore.restore("r1", to=tmp_path / "out", state_dir=state_dir)
    assert not (tmp_path / "out").exists()


def test_check_policy_and_backend_options(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "version: 1\nmounts:\n  /srv/db:\n    imager: fsfreeze\n    options:\n      fsfreeze: {sync: false}\n"
    )
    good.chmod(0o644)
    assert snapcore.check_policy(good) == []
    assert snapcore.backend_options(good, "/srv/db", "fsfreeze")["sync"] is False
    assert snapcore.backend_options(good, "/srv/db/", "fsfreeze")["sync"] is False
    with pytest.raises(UsageError, match="no rule for /srv/other"):
        snapcore.backend_options(good, "/srv/other", "fsfreeze")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nmounts:\n  /srv/db:\n    imager: fsfreeze\n    bogus: 1\n  /srv/x:\n    keep: {last: -1}\n"
    )
    bad.chmod(0o644)
    problems = snapcore.check_policy(bad)
    assert len(problems) == 2 and all(isinstance(p, PolicyError) for p in problems)
    assert {p.mount for p in problems} == {"/srv/db", "/srv/x"} and all(p.file == os.fspath(bad) for p in problems)
