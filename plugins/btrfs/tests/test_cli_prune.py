"""The CLI with btrfs mounts (checkpoint, show, verify, restore, prune) and retention."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import btrfsutil
import pytest
from btrfs_testlib import (  # the fixtures are used by name
    SubvolFactory,
    mount,
    need,
)

import snapcore
from snapcore import Plugins, main
from snapcore_btrfs import images, markers

Run = Callable[..., tuple[int, str, str]]

# the fixtures (btrfs_subvol, no_leftover_mounts; plugins and write_policy are snapcore.testing's)
pytest_plugins = ["btrfs_fixtures"]


@pytest.fixture
def run(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--state-dir", str(state_dir), *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_cli_several_mounts(btrfs_subvol: SubvolFactory, run: Run, state_dir: Path) -> None:
    a = btrfs_subvol()
    b = btrfs_subvol(fs=a.fs, name="@b")
    c = btrfs_subvol()
    for sv in (a, b, c):
        sv.write("who", sv.name)
    code, out, err = run("checkpoint", str(a.path), str(b.path), str(c.path), "--id", "k1", "--json")
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["outcome"] == "ok" and len(manifest["targets"]) == 3
    assert {t["imager"] for t in manifest["targets"]} == {"btrfs"}
    code, out, _ = run("verify", "k1")
    assert code == 0 and out.count("OK") == 3
    code, out, _ = run("restore", "k1", "--mount", str(b.path), "--to", str(a.fs.mount_point / "back"))
    assert code == 0 and (a.fs.mount_point / "back" / "who").read_text() == "@b"
    # damage: an image deleted behind snapcore's back
    images.delete_image(c.path / ".snapshots" / "k1")
    code, out, _ = run("verify", "k1")
    assert code == 1 and "missing" in out


def test_cli_bad_input(
    btrfs_subvol: SubvolFactory, run: Run, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    ro = btrfs_subvol(ro=True)
    policy = write_policy(f"version: 1\nmounts:\n  {ro.path}:\n    imager: btrfs\n")
    code, _, err = run("checkpoint", "--policy", str(policy))
    assert code == 2 and "read-only" in err
    sv = btrfs_subvol()
    (sv.path / "dir").mkdir()
    bind = mount(["--bind", str(sv.path / "dir")], tmp_path / "bind", sv.fs)
    policy = write_policy(f"version: 1\nmounts:\n  {bind}:\n    imager: btrfs\n")
    code, _, err = run("checkpoint", "--policy", str(policy))
    assert code == 2 and "not a subvolume" in err
    code, _, err = run("checkpoint", str(sv.path), "--id", "ok1")
    assert code == 0, err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = run("restore", "ok1", "--to", str(tmp_path / "full"))
    assert code == 1 and "not empty" in err
    assert (tmp_path / "full" / "x").read_text() == "x"
    code, _, err = run("restore", "ok1", "--in-place", "--mount", str(sv.fs.mount_point))
    assert code == 2


def _keep_policy(write_policy: Callable[[str], Path], mp: Path, keep: str, exporter: str = "") -> Path:
    return write_policy(f"version: 1\nmounts:\n  {mp}:\n    imager: btrfs\n{exporter}    keep: {keep}\n")


def test_prune_last(
    btrfs_subvol: SubvolFactory, run: Run, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    need("zstd")
    sv = btrfs_subvol()
    other = btrfs_subvol()
    exporter = f"    exporter: btrfs-send\n    options:\n      btrfs-send: {{dest: {tmp_path / 's'}, compress: zstd}}\n"
    policy = _keep_policy(write_policy, sv.path, "{last: 2}", exporter)
    other_policy = write_policy(f"version: 1\nmounts:\n  {other.path}:\n    imager: btrfs\n")  # no keep
    for i in range(4):
        sv.write("n", str(i))
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=f"k{i}")
        time.sleep(0.01)
    snapcore.checkpoint(policy=other_policy, state_dir=state_dir, checkpoint_id="other")
    # an image whose manifest is gone (an orphan) and a snapshot that is not snapcore's
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="orphan")
    manifest_dir = state_dir / "checkpoints" / "orphan"
    for p in manifest_dir.iterdir():
        p.unlink()
    manifest_dir.rmdir()
    btrfsutil.create_snapshot(str(sv.path), str(sv.path / ".snapshots" / "mine"), read_only=True)
    code, out, err = run("prune", "--dry-run")
    assert code == 0, err
    assert "would remove k1" in out and "would remove k0" in out and "would remove orphan" in out
    assert "keep   k3" in out and "keep   k2" in out
    assert f"{other.path}: no keep rule" in out
    assert (sv.path / ".snapshots" / "k0").exists()
    code, out, err = run("prune")
    assert code == 0, err
    names = sorted(p.name for p in (sv.path / ".snapshots").iterdir())
    assert names == ["k2", "k2.snapcore.json", "k3", "k3.snapcore.json", "mine"]
    assert not (state_dir / "checkpoints" / "k0").exists() and (state_dir / "checkpoints" / "k3").exists()
    assert (other.path / ".snapshots" / "other").exists()
    # exports went with their images, but k2's chain (k0, k1 streams) stays while k2/k3 need it
    assert sorted(p.name for p in (tmp_path / "s").glob("*.btrfs-send.json")) != []
    assert run("restore", "k2", "--to", str(other.path / "r2"))[0] == 0
    assert (other.path / "r2" / "n").read_text() == "2"
    code, out, _ = run("prune")
    assert code == 0 and "remove" not in out.replace("would remove", "")


def test_prune_within_never_removes_the_newest(
    btrfs_subvol: SubvolFactory, state_dir: Path, write_policy: Callable[[str], Path], plugins: Plugins
) -> None:
    a = btrfs_subvol()
    b = btrfs_subvol()
    policy = write_policy(
        f"version: 1\nmounts:\n  {a.path}:\n    imager: btrfs\n    keep: {{within: 1h}}\n"
        f"  {b.path}:\n    imager: btrfs\n    keep: {{last: 1}}\n"
    )
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="w1")
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="w2")
    report = snapcore.prune(state_dir=state_dir, plugins=plugins, now=time.time() + 3 * 3600)  # three hours later
    removed = {(e.mount, e.checkpoint_id) for e in report.removed}
    assert removed == {(str(a.path), "w1"), (str(b.path), "w1")}
    assert not report.errors
    assert not (state_dir / "checkpoints" / "w1").exists()
    assert (a.path / ".snapshots" / "w2").exists() and (b.path / ".snapshots" / "w2").exists()
    # a checkpoint with one target pruned and one kept is rewritten, not removed
    policy = write_policy(
        f"version: 1\nmounts:\n  {a.path}:\n    imager: btrfs\n    keep: {{last: 5}}\n"
        f"  {b.path}:\n    imager: btrfs\n    keep: {{last: 1}}\n"
    )
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="w3")
    snapcore.prune(state_dir=state_dir, plugins=plugins)
    w2 = snapcore.show("w2", state_dir=state_dir)
    assert [t.outcome for t in w2.targets] == ["ok", "pruned"]


def test_cli_delete(btrfs_subvol: SubvolFactory, run: Run, state_dir: Path) -> None:
    a = btrfs_subvol()
    b = btrfs_subvol(fs=a.fs, name="@b")
    assert run("checkpoint", str(a.path), str(b.path), "--id", "k1")[0] == 0
    assert run("checkpoint", str(a.path), "--id", "k2")[0] == 0
    btrfsutil.create_snapshot(str(a.path), str(a.path / ".snapshots" / "mine"), read_only=True)
    snaps = {(sv.name, cid): sv.path / ".snapshots" / cid for sv in (a, b) for cid in ("k1", "k2")}
    # bad input removes nothing
    code, _, err = run("delete", "k1", "nope")
    assert code == 2 and "no checkpoint 'nope'" in err
    code, _, err = run("delete", "k1", "--mount", str(a.fs.mount_point))
    assert code == 2 and "has no target" in err
    code, out, err = run("delete", "k1", "--dry-run")
    assert code == 0, err
    assert f"k1: {a.path}: would remove image {snaps[a.name, 'k1']}" in out and "k1: would remove its manifest" in out
    assert snaps[a.name, "k1"].exists() and snaps[b.name, "k1"].exists()
    # one mount's image
    code, out, err = run("delete", "k1", "--mount", str(b.path) + "/")
    assert code == 0, err
    assert not snaps[b.name, "k1"].exists() and snaps[a.name, "k1"].exists()
    manifest = snapcore.show("k1", state_dir=state_dir)
    assert {t.mount: t.outcome for t in manifest.targets} == {str(a.path): "ok", str(b.path): "deleted"}
    assert "its manifest" not in out
    code, out, _ = run("verify", "k1")
    assert code == 0 and out.count("OK") == 1
    # the rest, then nothing is left of it
    code, out, err = run("delete", "k1")
    assert code == 0, err
    assert not snaps[a.name, "k1"].exists() and "k1: removed its manifest" in out
    assert run("show", "k1")[0] == 2
    assert snaps[a.name, "k2"].exists() and (a.path / ".snapshots" / "mine").exists()
    code, out, _ = run("list")
    assert "k2" in out and "k1" not in out


def test_delete_through_a_tampered_manifest_never_removes_another_checkpoint_s_snapshot(
    btrfs_subvol: SubvolFactory, run: Run, state_dir: Path
) -> None:
    """A manifest whose image names another checkpoint's snapshot (edited by someone
    who could write the state directory): the marker says whose it is."""
    sv = btrfs_subvol()
    assert run("checkpoint", str(sv.path), "--id", "mine")[0] == 0
    assert run("checkpoint", str(sv.path), "--id", "theirs")[0] == 0
    theirs = sv.path / ".snapshots" / "theirs"
    path = state_dir / "checkpoints" / "mine" / "manifest.json"
    data = json.loads(path.read_text())
    data["targets"][0]["image"] = data["targets"][0]["image_record"]["ref"] = str(theirs)
    path.write_text(json.dumps(data))
    code, out, err = run("delete", "mine")
    assert code == 1 and "it is checkpoint theirs's, not mine's" in out + err, out + err
    assert theirs.exists() and markers.recognise(theirs) is not None
    # the uuid is checked too: a record naming the right checkpoint with another uuid
    data["targets"][0]["image"] = data["targets"][0]["image_record"]["ref"] = str(sv.path / ".snapshots" / "mine")
    data["targets"][0]["image_record"]["details"]["uuid"] = "0" * 32
    path.write_text(json.dumps(data))
    code, out, err = run("delete", "mine")
    assert code == 1 and "the manifest says 000" in out + err, out + err
    assert (sv.path / ".snapshots" / "mine").exists()


def test_cli_delete_whose_image_cannot_go_drops_only_the_export_from_the_manifest(
    btrfs_subvol: SubvolFactory, run: Run, state_dir: Path, write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    sv = btrfs_subvol()
    streams = tmp_path / "streams"
    policy = write_policy(
        f"version: 1\nmounts:\n  {sv.path}:\n    imager: btrfs\n    exporter: btrfs-send\n"
        f"    options:\n      btrfs-send: {{dest: {streams}}}\n"
    )
    assert run("checkpoint", "--policy", str(policy), "--id", "k1")[0] == 0
    snapshots = sv.path / ".snapshots"
    subprocess.run(["chattr", "+i", str(snapshots)], check=True)  # the snapshot cannot be deleted now
    try:
        code, out, err = run("delete", "k1")
        assert code == 1 and "Operation not permitted" in out and "could not be removed" in err
        record = snapcore.show("k1", state_dir=state_dir).targets[0]
        assert record.outcome == "ok" and record.export is None and record.export_record is None
        assert "export_removed" in record.extra
        assert (snapshots / "k1").exists() and not list(streams.glob("*.btrfs-send*"))
        assert run("verify", "k1")[0] == 0  # the image alone, as the manifest now says
    finally:
        subprocess.run(["chattr", "-i", str(snapshots)], check=True)
    code, out, err = run("delete", "k1")
    assert code == 0, err
    assert not (snapshots / "k1").exists() and "k1: removed its manifest" in out


def test_delete_and_prune_leave_a_mount_alone_while_it_is_checkpointed(
    btrfs_subvol: SubvolFactory, run: Run, state_dir: Path, write_policy: Callable[[str], Path]
) -> None:
    sv = btrfs_subvol()
    policy = _keep_policy(write_policy, sv.path, "{last: 1}")
    for cid in ("k1", "k2"):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=cid)
    with snapcore.hold(policy=policy, state_dir=state_dir, checkpoint_id="k3"):  # a checkpoint in progress
        code, out, err = run("delete", "k1")
        assert code == 1 and "being checkpointed already: checkpoint 'k3'" in out
        code, out, err = run("prune")
        assert code == 1 and f"{sv.path}: not pruned" in out
        assert (sv.path / ".snapshots" / "k1").exists()
        assert snapcore.show("k1", state_dir=state_dir).targets[0].outcome == "ok"
    code, out, err = run("prune")  # k3 is the newest now: k2 and k1 go
    assert code == 0, err
    assert sorted(p.name for p in (sv.path / ".snapshots").iterdir()) == ["k3", "k3.snapcore.json"]


def test_delete_of_an_unmounted_filesystem_s_image_waits_for_its_mount(
    btrfs_subvol: SubvolFactory, run: Run, state_dir: Path
) -> None:
    sv = btrfs_subvol()
    assert run("checkpoint", str(sv.path), "--id", "k1")[0] == 0
    subprocess.run(["umount", str(sv.path)], check=True)
    try:
        code, out, err = run("delete", "k1")
        assert code == 1 and "no btrfs is mounted there now" in out
        assert snapcore.show("k1", state_dir=state_dir).targets[0].outcome == "ok"  # still known, not lost track of
    finally:
        subprocess.run(["mount", "-t", "btrfs", "-o", f"subvol={sv.name}", sv.fs.device, str(sv.path)], check=True)
    code, out, err = run("delete", "k1")
    assert code == 0, err
    assert not (sv.path / ".snapshots" / "k1").exists() and "k1: removed its manifest" in out


@pytest.mark.usefixtures("no_leftover_mounts")
def test_the_states_restores_replace_are_pruned_like_checkpoints(
    btrfs_subvol: SubvolFactory, run: Run, state_dir: Path, write_policy: Callable[[str], Path]
) -> None:
    """Twenty restores must not leave twenty subvolumes no command sees: each replaced
    state is a checkpoint of the mount, kept by the mount's keep rule."""
    sv = btrfs_subvol()
    policy = _keep_policy(write_policy, sv.path, "{last: 2}")
    sv.write("n", "0")
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="base")
    kept = []
    for i in range(1, 4):
        sv.write("n", str(i))
        code, out, err = run("restore", "base", "--in-place")
        assert code == 0, err
        assert sv.path.joinpath("n").read_text() == "0"
        kept.append(out.rsplit("checkpoint ", 1)[1].strip())
        time.sleep(0.01)
    assert len(set(kept)) == 3
    code, out, _ = run("list")
    assert all(k in out for k in kept)
    # the newest two (by time) of the mount's images stay; the base is older than all
    code, out, err = run("prune")
    assert code == 0, err
    left = sorted(p.name for p in (state_dir / "checkpoints").iterdir())
    assert left == sorted(kept[1:])
    assert sorted(p.name for p in (sv.path / ".snapshots").iterdir() if not p.name.endswith(".json")) == sorted(
        kept[1:]
    )
    # a replaced state restores like any checkpoint: back to what "n" held before the last restore
    code, _, err = run("restore", kept[-1], "--in-place")
    assert code == 0, err
    assert sv.path.joinpath("n").read_text() == "3"
