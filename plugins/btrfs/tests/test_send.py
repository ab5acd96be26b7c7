"""The ``btrfs-send`` exporter: full and incremental streams, receive round trips, broken chains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import btrfsutil
import pytest
from btrfs_testlib import (  # the fixtures are used by name
    SNAPSHOTS,
    SubvolFactory,
    need,
    populate,
)

import snapcore
from snapcore import Cancel, Cancelled, CheckpointFailed, main
from snapcore.testing import BeforeFreeze, describe_tree, export_of, target_of
from snapcore_btrfs import images, send, send_hooks

# the fixtures (btrfs_subvol, no_leftover_mounts; plugins and write_policy are snapcore.testing's)
pytest_plugins = ["btrfs_fixtures"]


def _policy(sv_path: Path, dest: Path, compress: str = "zstd", extra: str = "") -> str:
    return (
        f"version: 1\nmounts:\n  {sv_path}:\n    imager: btrfs\n    exporter: btrfs-send\n"
        f"    options:\n      btrfs-send: {{dest: {dest}, compress: {compress}}}\n{extra}"
    )


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_full_and_incremental_round_trip(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path, compress: str
) -> None:
    if compress == "zstd":
        need("zstd")
    sv = btrfs_subvol()
    other = btrfs_subvol()  # receive on another filesystem, as on another node
    populate(sv.path, n=50)
    dest = tmp_path / "streams"
    policy = write_policy(_policy(sv.path, dest, compress))
    m1 = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="s1")
    first = describe_tree(sv.path, skip=SNAPSHOTS)
    sv.write("docs/f3.txt", "changed")
    (sv.path / "docs" / "f4.txt").unlink()
    sv.write("added/new.bin", b"\x00\x01" * 5000)
    m2 = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="s2")
    second = describe_tree(sv.path, skip=SNAPSHOTS)
    e1, e2 = export_of(m1.targets[0]), export_of(m2.targets[0])
    assert e1 is not None and e2 is not None
    assert e1.details["parent"] is None and e2.details["parent"] == "s1"
    assert Path(e2.ref).stat().st_size < Path(e1.ref).stat().st_size / 4  # only the change
    suffix = ".btrfs.zst" if compress == "zstd" else ".btrfs"
    assert e1.ref == f"{dest}/s1{suffix}"
    # byte-for-byte, through the CLI, on another filesystem
    assert main(["--state-dir", str(state_dir), "restore", "s2", "--to", str(other.path / "r2")]) == 0
    assert describe_tree(other.path / "r2", skip=SNAPSHOTS) == second
    assert main(["--state-dir", str(state_dir), "restore", "s1", "--to", str(other.path / "r1")]) == 0
    assert describe_tree(other.path / "r1", skip=SNAPSHOTS) == first
    (other.path / "r2" / "writable").write_text("yes")
    assert main(["--state-dir", str(state_dir), "verify", "s2"]) == 0
    # nothing of the staging is left behind
    assert sorted(p.name for p in other.path.iterdir()) == ["r1", "r2"]


def test_deleted_parents(
    btrfs_subvol: SubvolFactory,
    state_dir: Path,
    write_policy: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    need("zstd")
    sv = btrfs_subvol()
    other = btrfs_subvol()
    populate(sv.path)
    dest = tmp_path / "streams"
    policy = write_policy(_policy(sv.path, dest))
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="p1")
    sv.write("x", "x")
    m2 = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="p2")
    assert m2.targets[0].export_record["details"]["parent"] == "p1"  # type: ignore[index]
    # the parent snapshot is deleted: the next export is a full stream, and says so
    images.delete_image(sv.path / ".snapshots" / "p2")
    sv.write("y", "y")
    m3 = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="p3")
    assert m3.targets[0].export_record["details"]["parent"] == "p1"  # type: ignore[index]
    images.delete_image(sv.path / ".snapshots" / "p1")
    images.delete_image(sv.path / ".snapshots" / "p3")
    m4 = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="p4")
    [t4] = m4.targets
    assert t4.export_record["details"]["parent"] is None  # type: ignore[index]
    assert any("full stream" in w for w in t4.warnings)
    # a parent stream deleted by hand: restore and verify say which one, nothing is made
    (dest / "p1.btrfs.zst").unlink()
    capsys.readouterr()
    assert main(["--state-dir", str(state_dir), "restore", "p2", "--to", str(other.path / "r")]) == 1
    err = capsys.readouterr().err
    assert "p1.btrfs.zst is missing" in err and "needs it as its parent" in err
    assert not (other.path / "r").exists() and list(other.path.iterdir()) == []
    assert main(["--state-dir", str(state_dir), "verify", "p2"]) == 1
    # the full one still restores
    assert main(["--state-dir", str(state_dir), "restore", "p4", "--to", str(other.path / "r4")]) == 0
    assert (other.path / "r4" / "y").read_text() == "y"


def test_discard_keeps_streams_a_later_export_needs(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    need("zstd")
    sv = btrfs_subvol()
    populate(sv.path)
    dest = tmp_path / "streams"
    policy = write_policy(_policy(sv.path, dest))
    m1 = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="d1")
    sv.write("x", "x")
    m2 = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="d2")
    t1 = target_of(m1, m1.targets[0], state_dir)
    send_hooks.snapcore_discard(target=t1, image=None, export=export_of(m1.targets[0]))
    assert (dest / "d1.btrfs.zst").exists()  # d2 is incremental on it
    assert json.loads((dest / "d1.btrfs-send.json").read_text())["discarded"]
    assert send.find_parent(dest, str(sv.path), "d3") is not None
    t2 = target_of(m2, m2.targets[0], state_dir)
    send_hooks.snapcore_discard(target=t2, image=None, export=export_of(m2.targets[0]))
    assert sorted(p.name for p in dest.iterdir()) == []


def test_in_place_from_stream(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    need("zstd")
    sv = btrfs_subvol()
    populate(sv.path)
    before = describe_tree(sv.path, skip=SNAPSHOTS)
    policy = write_policy(_policy(sv.path, tmp_path / "streams"))
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="i1")
    images.delete_image(sv.path / ".snapshots" / "i1")  # only the stream is left
    sv.write("later", "later")
    assert main(["--state-dir", str(state_dir), "restore", "i1", "--in-place"]) == 0
    assert describe_tree(sv.path, skip=SNAPSHOTS) == before
    assert not any(n.startswith(".snapcore-receive") for n in os.listdir(sv.fs.mount_point))


def test_exporter_needs_the_btrfs_imager(
    loop_fs: object, btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    sv = btrfs_subvol()
    policy = write_policy(f"version: 1\nmounts:\n  {sv.path}:\n    imager: fsfreeze\n    exporter: btrfs-send\n")
    with pytest.raises(CheckpointFailed, match="use 'imager: btrfs'"):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="e1")


def test_a_cancelled_send_stops_and_leaves_no_partial_stream(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    need("zstd")
    sv = btrfs_subvol()
    populate(sv.path)
    snapshot = sv.fs.mount_point / "snap"
    btrfsutil.create_snapshot(str(sv.path), str(snapshot), read_only=True)
    dest = tmp_path / "streams"
    cancel = Cancel()
    cancel.set("test")  # before btrfs send starts: it is started, then killed at once

    try:
        with pytest.raises(Cancelled, match=r"btrfs send of .* stopped: the checkpoint was cancelled \(test\)"):
            send.export(
                checkpoint_id="x1",
                mount=str(sv.path),
                snapshot=snapshot,
                dest=dest,
                compress="zstd",
                incremental=False,
                cancel=cancel,
            )
    finally:
        btrfsutil.delete_subvolume(str(snapshot))
    assert sorted(p.name for p in dest.iterdir()) == []


def test_recover_removes_a_planted_partial_stream_of_a_controller_killed_at_export(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """A fake for what cannot be timed for real (a send is too quick to kill halfway
    on demand): the controller really dies where the export starts; the test then
    leaves the ``.partial`` stream that ``btrfs send`` would have been writing."""
    need("zstd")
    sv = btrfs_subvol()
    populate(sv.path)
    dest = tmp_path / "streams"
    policy = write_policy(_policy(sv.path, dest))
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="k0")  # another checkpoint's stream
    argv = [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "checkpoint", "--policy", str(policy)]
    killed = subprocess.run(
        [*argv, "--id", "k1"], env=dict(os.environ, SNAPCORE_FAULT="export=kill"), capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (dest / ".k1.btrfs.zst.partial").write_bytes(b"half a stream")

    assert main(["--state-dir", str(state_dir), "recover"]) == 0

    assert sorted(p.name for p in dest.iterdir()) == ["k0.btrfs-send.json", "k0.btrfs.zst"]
    assert not (sv.path / ".snapshots" / "k1").exists()  # the image went with it


def _change_after_the_precopy(root: Path) -> object:
    """What the application does between the pre-copy and the snapshot; the tree then."""
    (root / "docs" / "f3.txt").write_text("changed after the pre-copy")
    (root / "docs" / "f4.txt").unlink()
    (root / "added").mkdir()
    (root / "added" / "new.bin").write_bytes(b"\x00\x01" * 5000)
    return describe_tree(root, skip=SNAPSHOTS)


def test_precopy_sends_the_live_tree_first_and_the_checkpoint_against_it(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """``precopy: true``: a snapshot of the live subvolume, sent before the freeze; the
    checkpoint's stream is incremental against it (only what changed in between),
    the restore replays both, the pre-copy's snapshot is gone, and deleting the
    checkpoint deletes both streams."""
    sv = btrfs_subvol()
    other = btrfs_subvol()
    populate(sv.path, n=50)
    (sv.path / "bulk.bin").write_bytes(os.urandom(4 << 20))
    dest = tmp_path / "streams"
    policy = write_policy(_policy(sv.path, dest, "none").replace("compress: none}", "compress: none, precopy: true}"))
    plugins = snapcore.make_plugins()
    change = BeforeFreeze(lambda: _change_after_the_precopy(sv.path))
    plugins.pm.register(change)
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="c1", plugins=plugins)
    [record] = manifest.targets
    assert record.outcome == "ok", record.error
    assert record.precopy is not None and record.precopy[0]["stream"] == "c1.precopy.btrfs", record.precopy
    export = export_of(record)
    assert export is not None and export.details["parent"] == "c1.precopy"
    assert export.details["chain"] == ["c1.precopy.btrfs", "c1.btrfs"]
    assert record.precopy[0]["bytes"] > 4 << 20 and Path(export.ref).stat().st_size < 64 * 1024  # the change only
    assert not (sv.path / ".snapshots" / "c1.precopy").exists() and (sv.path / ".snapshots" / "c1").is_dir()
    assert main(["--state-dir", str(state_dir), "restore", "c1", "--to", str(other.path / "r1")]) == 0
    assert describe_tree(other.path / "r1", skip=SNAPSHOTS) == change.result
    assert main(["--state-dir", str(state_dir), "verify", "c1"]) == 0
    assert main(["--state-dir", str(state_dir), "delete", "c1"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == []


def test_a_failure_after_the_precopy_leaves_no_stream_and_no_snapshot(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """A fault at the snapshot (a fake of a failure there) after the pre-copy was sent:
    its stream, its record and its snapshot go; then a SIGKILL at the same point and
    ``snapcore recover`` do the same."""
    sv = btrfs_subvol()
    populate(sv.path, n=10)
    dest = tmp_path / "streams"
    policy = write_policy(_policy(sv.path, dest, "none").replace("compress: none}", "compress: none, precopy: true}"))
    for cid, fault, code in (("f1", "snapshot=raise", 1), ("k1", "snapshot=kill", -signal.SIGKILL)):
        argv = [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "checkpoint", "--policy", str(policy)]
        done = subprocess.run(
            [*argv, "--id", cid], env=dict(os.environ, SNAPCORE_FAULT=fault), capture_output=True, text=True
        )
        assert done.returncode == code, done.stderr
        if code < 0:
            assert (dest / f"{cid}.precopy.btrfs").exists()  # what recover must remove
            recovered = subprocess.run(
                [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "recover"],
                capture_output=True,
                text=True,
            )
            assert recovered.returncode == 0 and "Traceback" not in recovered.stderr, recovered.stderr
        assert sorted(p.name for p in dest.iterdir()) == [], sorted(p.name for p in dest.iterdir())
        assert not (sv.path / ".snapshots" / f"{cid}.precopy").exists()
