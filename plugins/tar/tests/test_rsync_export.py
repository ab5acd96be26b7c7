"""The rsync exporter on real loop filesystems: locally, to an rsync daemon and over
ssh (OpenSSH's client, a test SSH server), both on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest
from tar_helpers import (
    MiB,
    exporter_policy,
    free_port,
    make_every_kind,
    rsync_daemon,
    ssh_server,
)

import snapcore
from snapcore import CheckpointFailed, find_mount, main, make_plugins
from snapcore.testing import LoopFactory, LoopFS, assert_not_frozen, assert_same_tree, describe_tree
from snapcore_tar.progress import Progress

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems and device nodes need root")


def _details(manifest: snapcore.Manifest) -> dict[str, object]:
    record = manifest.targets[0]
    assert record.outcome == "ok", record.error
    assert record.export_record is not None
    return dict(record.export_record["details"])


def test_rsync_round_trip_and_link_dest_chain(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4", size_mb=64)
    out = loop_fs("ext4", size_mb=160)
    make_every_kind(src.mount_point)
    dest = out.mount_point / "trees"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": str(dest)})
    states = []
    for step, cid in enumerate(["r0", "r1", "r2"]):
        if step == 1:
            (src.mount_point / "small.txt").write_text("changed\n")
            (src.mount_point / "new-file").write_bytes(os.urandom(3000))
        elif step == 2:
            (src.mount_point / "new-file").unlink()
            (src.mount_point / "dir" / "sub").rename(src.mount_point / "dir" / "moved")
        states.append(describe_tree(src.mount_point, metadata=True))
        manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=cid)
        details = _details(manifest)
        assert details["link_dest"] == (None if step == 0 else f"r{step - 1}")
        assert manifest.targets[0].consistency == "fs-frozen"
    assert_not_frozen(src.mount_point)
    name = str(details["slug"])

    # unchanged files are hard links to the previous tree; changed ones are not
    big = Path("dir") / "random.bin"
    assert (dest / "r0" / name / big).stat().st_ino == (dest / "r2" / name / big).stat().st_ino
    assert (dest / "r0" / name / "small.txt").stat().st_ino != (dest / "r1" / name / "small.txt").stat().st_ino
    assert (dest / "r2" / "manifest.json").is_file() and (dest / f"{name}.latest").read_text().strip() == "r2"

    for cid, state in zip(["r0", "r1", "r2"], states, strict=True):
        assert main(["--state-dir", str(state_dir), "verify", cid]) == 0
        restored = out.mount_point / f"restored-{cid}"
        assert main(["restore", "--from", str(dest / cid), "--to", str(restored)]) == 0
        assert_same_tree(restored, state)
    capsys.readouterr()

    # a file gone from a tree is found by verify, against the recorded file list
    (dest / "r1" / name / "dir" / "sub" / "deep.txt").unlink()
    assert main(["--state-dir", str(state_dir), "verify", "r1"]) == 1
    assert "dir/sub/deep.txt: missing from the tree" in capsys.readouterr().out

    # a failed checkpoint leaves nothing, and the earlier trees stay as they were
    before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    with pytest.raises(CheckpointFailed):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="r3", payload=lambda c: 1)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == before


def _remote_round_trip(src: LoopFS, out: LoopFS, trees: Path, policy: Path, state_dir: Path, dest: str, p: str) -> str:
    """Two checkpoints (``{p}0``, ``{p}1``) to a remote ``dest`` whose trees land in
    ``trees``: ``--link-dest`` on the far side, verify, restore, and a failed third
    checkpoint whose tree is taken back. Returns the mount's slug."""
    states = []
    for step, cid in enumerate([f"{p}0", f"{p}1"]):
        if step:
            (src.mount_point / "small.txt").write_text(f"changed remotely ({dest})\n")
        states.append(describe_tree(src.mount_point, metadata=True))
        details = _details(snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=cid))
        assert details["dest"] == dest and details["link_dest"] == (f"{p}{step - 1}" if step else None)
    name = str(details["slug"])
    assert json.loads((trees / f"{p}1" / "manifest.json").read_text())["id"] == f"{p}1"
    big = Path("dir") / "random.bin"
    assert (trees / f"{p}0" / name / big).stat().st_ino == (trees / f"{p}1" / name / big).stat().st_ino, (
        "--link-dest works on the far side"
    )
    assert main(["--state-dir", str(state_dir), "verify", f"{p}1"]) == 0
    restored = out.mount_point / f"restored-{p}"
    assert main(["--state-dir", str(state_dir), "restore", f"{p}1", "--to", str(restored)]) == 0
    assert_same_tree(restored, states[1])
    # discard on the far side: a failing payload after the export
    with pytest.raises(CheckpointFailed):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=f"{p}2", payload=lambda c: 1)
    assert not (trees / f"{p}2" / name).exists() and not (trees / f"{p}2" / f"{name}.export.json").exists()
    assert (trees / f"{name}.latest").read_text().strip() == f"{p}1"
    return name


def test_rsync_daemon_dest(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    src = loop_fs("ext4", size_mb=32)
    out = loop_fs("ext4", size_mb=96)
    make_every_kind(src.mount_point)
    module = out.mount_point / "module"
    trees = module / "exports"
    trees.mkdir(parents=True)
    with rsync_daemon(module, tmp_path) as url:
        dest = f"{url}/exports"
        policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": dest})
        name = _remote_round_trip(src, out, trees, policy, state_dir, dest, "d")
        big = Path("dir") / "random.bin"
        # keep applies to the trees (fsfreeze keeps no image): prune removes d0 on the daemon
        policy.write_text(policy.read_text() + "    keep: {last: 2}\n")
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="d3")
        assert main(["--state-dir", str(state_dir), "prune"]) == 0
        assert not (trees / "d0" / name).exists() and not (state_dir / "checkpoints" / "d0").exists()
        assert (trees / "d1" / name / big).is_file()
        assert main(["--state-dir", str(state_dir), "delete", "d1"]) == 0
        assert not (trees / "d1" / name).exists() and (trees / "d3" / name / big).is_file()
        assert main(["--state-dir", str(state_dir), "verify", "d3"]) == 0


def test_rsync_over_ssh(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4", size_mb=32)
    out = loop_fs("ext4", size_mb=96)
    make_every_kind(src.mount_point)
    trees = out.mount_point / "exports"
    trees.mkdir()
    sd = ["--state-dir", str(state_dir)]
    with ssh_server(tmp_path) as rsh:
        dest = f"root@127.0.0.1:{trees}"
        policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": dest, "rsh": rsh})
        name = _remote_round_trip(src, out, trees, policy, state_dir, dest, "s")
        # delete removes a tree there
        assert main([*sd, "delete", "s0"]) == 0
        assert not (trees / "s0" / name).exists() and (trees / "s1" / name / "dir" / "random.bin").is_file()
        # a key the server does not accept: refused before anything is frozen
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
        stranger = rsh.replace(str(tmp_path / "client"), str(tmp_path / "stranger"))
        policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": dest, "rsh": stranger}, name="stranger")
        capsys.readouterr()
        assert main([*sd, "checkpoint", "--policy", str(policy), "--id", "s3"]) == 1
        assert f"reaching {dest}" in capsys.readouterr().err
        assert not (state_dir / "checkpoints" / "s3").exists() or load_outcome(state_dir, "s3") == "failed"
    assert_not_frozen(src.mount_point)


def load_outcome(state_dir: Path, cid: str) -> str:
    return str(json.loads((state_dir / "checkpoints" / cid / "manifest.json").read_text())["outcome"])


def test_rsync_bad_input(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    src.write("f", "x")
    sd = ["--state-dir", str(state_dir)]

    def run(dest: str, cid: str) -> int:
        policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": dest, "timeout": "5s"}, name=cid)
        return main([*sd, "checkpoint", "--policy", str(policy), "--id", cid])

    # nobody listens on this port of 127.0.0.1
    assert run(f"rsync://127.0.0.1:{free_port()}/backup", "u1") == 1
    assert "reaching rsync://127.0.0.1" in capsys.readouterr().err
    assert run("relative/path", "u2") == 1
    assert "neither an absolute path" in capsys.readouterr().err
    assert run(str(out.mount_point / "missing"), "u3") == 1
    assert "does not exist" in capsys.readouterr().err
    assert_not_frozen(src.mount_point)


def test_rsync_full_dest_fails_cleanly(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    src = loop_fs("ext4", size_mb=64)
    small = loop_fs("ext4", size_mb=16)
    for i in range(3):
        src.write(f"big-{i}", os.urandom(10 * MiB))
    policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": str(small.mount_point)})
    with pytest.raises(CheckpointFailed) as info:
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="full")
    assert "No space left on device" in str(info.value), str(info.value)
    assert sorted(p.name for p in small.mount_point.iterdir()) == ["lost+found"]
    assert_not_frozen(src.mount_point)


def test_btrfs_snapshot_then_rsync(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    if "btrfs" not in make_plugins().backends:
        pytest.skip("the btrfs backend (snapcore-btrfs) is not installed")
    src = loop_fs("btrfs")
    out = loop_fs("ext4", size_mb=64)
    make_every_kind(src.mount_point)
    dest = out.mount_point
    policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": str(dest)}, imager="btrfs")
    expected = describe_tree(src.mount_point, metadata=True)
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="b1")
    details = _details(manifest)
    assert manifest.targets[0].imager == "btrfs" and manifest.targets[0].image
    # written after the snapshot: not in the export
    (src.mount_point / "after").write_text("later")
    assert main(["--state-dir", str(state_dir), "verify", "b1"]) == 0
    restored = out.mount_point / "restored"
    assert main(["restore", "--from", str(dest / "b1"), "--to", str(restored)]) == 0
    got = describe_tree(restored, metadata=True)
    # the snapshot directory (a nested subvolume) is not copied: one filesystem only
    expected = {k: v for k, v in expected.items() if not k.startswith(b".snapshots")}
    got = {k: v for k, v in got.items() if not k.startswith(b".snapshots")}
    root = b"."
    expected.pop(root)
    got.pop(root)
    assert got == expected
    assert not (restored / "after").exists()
    info = json.loads((dest / "b1" / f"{details['slug']}.export.json").read_text())
    assert info["files"] == len((dest / "b1" / f"{details['slug']}.files").read_text().splitlines()) > 20


def test_progress_bar_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    monkeypatch.setenv("SNAPCORE_PROGRESS", "always")
    bar = Progress("tar /x", total_bytes=4 * MiB, stream=stream)
    bar.add(nbytes=MiB, files=10)
    bar._drawn = 0.0
    bar.add(nbytes=MiB, files=5)
    bar.close(True)
    text = stream.getvalue()
    assert "\r" in text and "2.0 MiB" in text and "15 files" in text and "50%" in text and "/s" in text
    monkeypatch.setenv("SNAPCORE_PROGRESS", "auto")
    plain = io.StringIO()  # not a terminal: log lines only, nothing drawn
    quiet = Progress("tar /x", stream=plain)
    quiet.add(nbytes=MiB, files=1)
    quiet.close(True)
    assert plain.getvalue() == ""


def test_remote_latest_pointer_moves_within_one_second(loop_fs: LoopFactory, tmp_path: Path) -> None:
    """Two checkpoints published within one second: the pointers "p0" and "p1" have
    one size and one mtime, which rsync's quick check alone would take as unchanged."""
    import time

    from snapcore_tar import rsync_export

    out = loop_fs("ext4")
    mount = find_mount(out.mount_point)
    with rsync_daemon(out.mount_point, tmp_path) as url:
        time.sleep(1 - time.time() % 1)  # at the start of a second: both fit in it
        for cid in ("p0", "p1"):
            target = snapcore.Target(
                checkpoint_id=cid, mount=mount, imager="fsfreeze", exporter="rsync", options={"rsync": {"dest": url}}
            )
            export = snapcore.Export(
                backend="rsync", ref=f"{url}/{cid}/t", path=f"{url}/{cid}", details={"dest": url, "slug": "t"}
            )
            rsync_export.publish(target, export, json.dumps({"id": cid}))
        assert (out.mount_point / "t.latest").read_text() == "p1\n"


def test_a_tree_swapped_for_a_symlink_is_never_restored(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Restore refuses what verify calls DAMAGED: the tree replaced by a symlink to a
    directory holding a secret would copy the secret into the restore."""
    src = loop_fs("ext4", size_mb=64)
    out = loop_fs("ext4", size_mb=64)
    (src.mount_point / "data.txt").write_text("mine\n")
    dest = out.mount_point / "trees"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": str(dest)})
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="sw")
    name = str(_details(manifest)["slug"])
    secret = out.mount_point / "secret"
    secret.mkdir()
    (secret / "data.txt").write_text("mine\n")
    (secret / "id_rsa").write_text("KEY\n")
    (secret / "id_rsa").chmod(0o600)
    tree = dest / "sw" / name
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    tree.symlink_to(secret)
    assert main(["verify", "--from", str(dest / "sw")]) == 1
    assert "not a directory (a symlink?)" in capsys.readouterr().out
    restored = out.mount_point / "restored"
    assert main(["restore", "--from", str(dest / "sw"), "--to", str(restored)]) == 1
    assert "refusing to restore" in capsys.readouterr().err
    assert not (restored / "id_rsa").exists()
