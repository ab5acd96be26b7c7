"""The tar exporter on real loop filesystems: round trips, chains, the CLI, failures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tar_helpers import MiB, exporter_policy, make_every_kind

import snapcore
from snapcore import CheckpointFailed, main
from snapcore.testing import LoopFactory, LoopFS, assert_not_frozen, assert_same_tree, describe_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems and device nodes need root")


def _export_dir(dest: Path, cid: str) -> Path:
    return dest / cid


def _archives(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*.tar*") if not p.name.endswith(".sha256"))


@pytest.mark.parametrize("compress", ["none", "gzip", "zstd"])
def test_every_kind_of_file_round_trips_bit_for_bit(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, compress: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if compress == "gzip":  # the progress bar's path too (tar -v, size watcher)
        monkeypatch.setenv("SNAPCORE_PROGRESS", "always")
    src = loop_fs("ext4", size_mb=64)
    out = loop_fs("ext4", size_mb=96)
    make_every_kind(src.mount_point)
    expected = describe_tree(src.mount_point, metadata=True)
    dest = out.mount_point / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest), "compress": compress})

    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="c1")

    record = manifest.targets[0]
    assert record.outcome == "ok"
    assert record.consistency == "fs-frozen"  # fsfreeze + tar: copied inside the freeze window
    export_dir = dest / "c1"
    suffix = {"none": "", "gzip": ".gz", "zstd": ".zst"}[compress]
    name = record.export_record["details"]["slug"] if record.export_record else ""
    archive = export_dir / f"{name}.tar{suffix}"
    assert record.export == str(archive) and archive.is_file()
    # the manifest travels with the export, with a checksum beside the archive
    copy = json.loads((export_dir / "manifest.json").read_text())
    assert copy["id"] == "c1" and copy["outcome"] == "ok"
    sha_line = (export_dir / f"{archive.name}.sha256").read_text()
    assert sha_line.split()[1] == archive.name
    assert (dest / f"{name}.latest").read_text().strip() == "c1"
    assert not list(export_dir.glob(".*")), "no temporary file left"
    assert_not_frozen(src.mount_point)

    assert main(["--state-dir", str(state_dir), "verify", "c1"]) == 0
    restored = out.mount_point / "restored"
    assert main(["--state-dir", str(state_dir), "restore", "c1", "--to", str(restored)]) == 0
    assert_same_tree(restored, expected)


def _mutate(root: Path, step: int) -> None:
    if step == 1:
        (root / "dir" / "added-1").write_bytes(os.urandom(5000))
        (root / "small.txt").write_text("changed in step 1\n")
        os.unlink(root / "empty")
    elif step == 2:
        (root / "dir" / "sub").rename(root / "dir" / "moved")
        (root / "dir" / "added-1").unlink()
        os.symlink("moved", root / "dir" / "to-moved")
        os.setxattr(root / "hard-a", "user.step", b"2")


def test_incremental_chain_of_three_restores_each_point(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    src = loop_fs("ext4", size_mb=64)
    out = loop_fs("ext4", size_mb=128)
    make_every_kind(src.mount_point)
    dest = out.mount_point / "exports"
    dest.mkdir()
    options = {"dest": str(dest), "compress": "zstd", "incremental": True}
    policy = exporter_policy(tmp_path, src.mount_point, "tar", options)
    states = []
    sizes = []
    for step, cid in enumerate(["i0", "i1", "i2"]):
        if step:
            _mutate(src.mount_point, step)
        states.append(describe_tree(src.mount_point, metadata=True))
        manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=cid)
        details = manifest.targets[0].export_record["details"]  # type: ignore[index]
        assert details["level"] == step
        assert details["chain"] == ["i0", "i1", "i2"][: step + 1]
        assert (dest / cid / f"{details['slug']}.snar").is_file(), "the snapshot file is kept beside the archive"
        sizes.append(details["bytes"])
    assert sizes[1] < sizes[0] / 4 and sizes[2] < sizes[0] / 4, "increments hold only what changed"

    for cid, state in zip(["i0", "i1", "i2"], states, strict=True):
        assert main(["--state-dir", str(state_dir), "verify", cid]) == 0
        restored = out.mount_point / f"restored-{cid}"
        assert main(["restore", "--from", str(dest / cid), "--to", str(restored)]) == 0
        assert_same_tree(restored, state)

    # a chain without its base is reported, and restoring it fails before writing anything
    shutil.move(dest / "i0", tmp_path / "i0-away")
    assert main(["--state-dir", str(state_dir), "verify", "i2"]) == 1
    restored = out.mount_point / "restored-broken"
    assert main(["restore", "--from", str(dest / "i2"), "--to", str(restored)]) == 1
    assert not restored.exists() or not any(restored.iterdir())


def test_full_every_starts_a_new_chain(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    src.write("a", "a")
    dest = out.mount_point
    policy = exporter_policy(
        tmp_path, src.mount_point, "tar", {"dest": str(dest), "incremental": True, "full_every": 1}
    )
    levels = []
    for cid in ["f0", "f1", "f2"]:
        src.write(cid, cid)
        manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=cid)
        levels.append(manifest.targets[0].export_record["details"]["level"])  # type: ignore[index]
    assert levels == [0, 1, 0]


def test_cli_checkpoint_verify_restore_from_export_dir(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4", size_mb=32)
    out = loop_fs("ext4", size_mb=64)
    make_every_kind(src.mount_point)
    expected = describe_tree(src.mount_point, metadata=True)
    dest = out.mount_point / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest), "compress": "gzip"})

    assert main(["--state-dir", str(state_dir), "checkpoint", "--policy", str(policy), "--id", "cli1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["outcome"] == "ok" and printed["targets"][0]["exporter"] == "tar"

    # another host: only the export directory, copied somewhere else, no state dir
    elsewhere = out.mount_point / "carried" / "cli1"
    shutil.copytree(dest / "cli1", elsewhere)
    assert main(["verify", "--from", str(elsewhere)]) == 0
    assert "OK" in capsys.readouterr().out
    restored = out.mount_point / "restored"
    assert main(["restore", "--from", str(elsewhere), "--to", str(restored)]) == 0
    assert str(restored) in capsys.readouterr().out
    assert_same_tree(restored, expected)

    # a non-empty target directory is refused
    assert main(["restore", "--from", str(elsewhere), "--to", str(restored)]) == 1
    assert "not empty" in capsys.readouterr().err
    # ID and --from together, or neither, is a usage error
    assert main(["restore", "cli1", "--from", str(elsewhere), "--to", str(tmp_path / "x")]) == 2
    assert main(["restore", "--to", str(tmp_path / "x")]) == 2
    # in place is refused for an export
    assert main(["--state-dir", str(state_dir), "restore", "cli1", "--in-place"]) == 1
    assert "never in place" in capsys.readouterr().err


def test_corrupt_archive_is_found_and_never_restored(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    src.write("data", os.urandom(200_000))
    dest = out.mount_point
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest)})
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="k1")
    (archive,) = _archives(dest)
    with open(archive, "r+b") as f:
        f.seek(100_000)
        f.write(b"\xff" * 16)
    assert main(["--state-dir", str(state_dir), "verify", "k1"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().out
    restored = out.mount_point / "r"
    assert main(["--state-dir", str(state_dir), "restore", "k1", "--to", str(restored)]) == 1
    assert "corrupt" in capsys.readouterr().err
    assert not restored.exists()

    # a truncated archive whose checksum was "fixed" up: GNU tar finds it short
    with open(archive, "r+b") as f:
        f.truncate(archive.stat().st_size // 2)
    sums = archive.with_name(archive.name + ".sha256")
    info_path = next(archive.parent.glob("*.export.json"))
    info = json.loads(info_path.read_text())
    import hashlib

    info["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
    info_path.write_text(json.dumps(info))
    sums.write_text(f"{info['sha256']}  {archive.name}\n")
    assert main(["--state-dir", str(state_dir), "verify", "k1"]) == 1
    assert main(["--state-dir", str(state_dir), "restore", "k1", "--to", str(restored)]) == 1
    assert not restored.exists()


def test_full_dest_fails_cleanly(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    src = loop_fs("ext4", size_mb=64)
    small = loop_fs("ext4", size_mb=16)
    src.write("big", os.urandom(30 * MiB))
    dest = small.mount_point / "exports"
    dest.mkdir()
    # an earlier good export in the same dest must survive
    (dest / "keep-me").write_text("earlier export")
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest)})
    with pytest.raises(CheckpointFailed) as info:
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="full")
    assert "No space left on device" in str(info.value), str(info.value)
    assert info.value.manifest.targets[0].outcome == "failed"  # type: ignore[attr-defined]
    assert sorted(p.name for p in dest.iterdir()) == ["keep-me"], "nothing half-made is left in dest"
    assert_not_frozen(src.mount_point)


def test_bad_input(
    loop_fs: LoopFactory,
    state_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    src.write("f", "x")
    sd = ["--state-dir", str(state_dir)]

    def run(options: dict[str, object], cid: str) -> int:
        policy = exporter_policy(tmp_path, src.mount_point, "tar", options, name=cid)
        return main([*sd, "checkpoint", "--policy", str(policy), "--id", cid])

    # dest missing from the options: the policy is refused (exit 2) before anything runs
    assert run({}, "b1") == 2
    assert "options.tar.dest" in capsys.readouterr().err
    # dest that does not exist
    assert run({"dest": str(out.mount_point / "nope")}, "b2") == 1
    assert "does not exist" in capsys.readouterr().err
    # unknown compression: a policy error naming the choices
    assert run({"dest": str(out.mount_point), "compress": "xz"}, "b3") == 2
    assert "none, gzip, zstd" in capsys.readouterr().err
    # dest on the filesystem being exported
    assert run({"dest": str(src.mount_point)}, "b4") == 1
    assert "filesystem being exported" in capsys.readouterr().err
    # dest not writable: a read-only filesystem
    ro = loop_fs("ext4", mount_options="ro")
    assert run({"dest": str(ro.mount_point)}, "b5") == 1
    assert "not writable" in capsys.readouterr().err
    # a compressor this machine lacks: PATH without zstd (tar itself is still there)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("tar") or "/usr/bin/tar", bin_dir / "tar")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert run({"dest": str(out.mount_point), "compress": "zstd"}, "b6") == 1
    assert "apt-get install zstd" in capsys.readouterr().err
    monkeypatch.undo()
    assert not list(out.mount_point.glob("b*")), "no failed checkpoint left anything in dest"
    assert_not_frozen(src.mount_point)


def test_failure_after_export_discards_it(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    src.write("f", "x")
    dest = out.mount_point
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest), "incremental": True})
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="g1")
    before = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    with pytest.raises(CheckpointFailed):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="g2", payload=lambda c: 3)
    after = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert after == before, "the failed checkpoint's export is gone, the earlier one untouched"
    assert main(["--state-dir", str(state_dir), "verify", "g1"]) == 0


def test_dest_on_another_target_of_the_checkpoint_is_refused(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = loop_fs("ext4")
    b = loop_fs("ext4")
    a.write("f", "x")
    policy = tmp_path / "two.yaml"
    policy.write_text(
        f"version: 1\nmounts:\n  {a.mount_point}:\n    imager: fsfreeze\n    exporter: tar\n"
        f"    options:\n      tar: {{dest: {b.mount_point}}}\n  {b.mount_point}:\n    imager: fsfreeze\n"
    )
    assert main(["--state-dir", str(state_dir), "checkpoint", "--policy", str(policy), "--id", "two"]) == 1
    assert "a target of this checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in b.mount_point.iterdir()) == ["lost+found"]
    assert_not_frozen(a.mount_point)
    assert_not_frozen(b.mount_point)


def _chain_of_two(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> LoopFS:
    """Checkpoints c0 (level 0) and c1 (an increment on it) exported to a new fs."""
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    src.write("f", "x")
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(out.mount_point), "incremental": True})
    for cid in ("c0", "c1"):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=cid)
    return out


def test_discard_refuses_to_break_a_chain(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    from snapcore.testing import export_of, target_of

    out = _chain_of_two(loop_fs, state_dir, tmp_path)
    plugins = snapcore.make_plugins()
    manifests = {cid: snapcore.show(cid, state_dir=state_dir) for cid in ("c0", "c1")}
    targets = {cid: target_of(m, m.targets[0], state_dir) for cid, m in manifests.items()}
    exports = {cid: export_of(m.targets[0]) for cid, m in manifests.items()}
    with pytest.raises(snapcore.BackendError, match="base of later increments"):
        plugins.discard("tar", targets["c0"], None, exports["c0"])
    plugins.discard("tar", targets["c1"], None, exports["c1"])  # the newest goes
    assert not (out.mount_point / "c1").exists()
    plugins.discard("tar", targets["c0"], None, exports["c0"])  # then its base
    assert not (out.mount_point / "c0").exists()
    assert sorted(p.name for p in out.mount_point.iterdir()) == ["lost+found"]


def test_cli_delete_keeps_a_chain_base_until_its_increments_go(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _chain_of_two(loop_fs, state_dir, tmp_path)
    base = ["--state-dir", str(state_dir)]
    capsys.readouterr()
    assert main([*base, "delete", "c0"]) == 1  # c1 is an increment on c0
    out_text, err = capsys.readouterr()
    assert "base of later increments (c1)" in out_text and "could not be removed" in err
    assert (out.mount_point / "c0").is_dir() and main([*base, "verify", "c0"]) == 0  # nothing lost
    capsys.readouterr()
    assert main([*base, "delete", "c1", "c0"]) == 0  # newest first: both go
    out_text = capsys.readouterr().out
    assert "c1: removed its manifest" in out_text and "c0: removed its manifest" in out_text
    assert sorted(p.name for p in out.mount_point.iterdir()) == ["lost+found"]
    assert not (state_dir / "checkpoints" / "c0").exists() and not (state_dir / "checkpoints" / "c1").exists()


def test_prune_applies_keep_to_the_exports_of_a_frozen_tree_and_keeps_chain_bases(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    chained = out.mount_point / "chained"  # one chain: every export builds on the previous
    fresh = out.mount_point / "fresh"  # a new level 0 after each increment
    chained.mkdir()
    fresh.mkdir()
    base = ["--state-dir", str(state_dir)]
    for dest, full_every, name in ((chained, 0, "a"), (fresh, 1, "b")):
        policy = exporter_policy(
            tmp_path,
            src.mount_point,
            "tar",
            {"dest": str(dest), "incremental": True, "full_every": full_every},
            name=name,
        )
        policy.write_text(policy.read_text() + "    keep: {last: 2}\n")
        for i in range(4):
            src.write("n", f"{name}{i}")
            snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id=f"{name}{i}")
        capsys.readouterr()
        assert main([*base, "prune", "--dry-run"]) == 0
        assert f"would remove {name}1" in capsys.readouterr().out.replace("\n", " ")
        assert main([*base, "prune"]) == 0
        text = capsys.readouterr().out
        assert "keep   " + f"{name}3" in text and "keep   " + f"{name}2" in text
        left = sorted(p.name for p in dest.iterdir() if p.is_dir())
        if full_every:  # b0 <- b1, b2 <- b3: the older chain goes, newest increment first
            assert left == ["b2", "b3"], text
            assert not (state_dir / "checkpoints" / "b0").exists()
        else:  # a0 <- a1 <- a2 <- a3: the kept ones need the whole chain
            assert left == ["a0", "a1", "a2", "a3"], text
            assert "still needed" in text and "export a1 is the base of later increments (a2, a3)" in text
        restored = tmp_path / f"r-{name}"
        assert main([*base, "restore", f"{name}2", "--to", str(restored)]) == 0
        assert (restored / "n").read_text() == f"{name}2"


def test_the_python_api_restores_and_verifies_an_export(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    """``snapcore.restore``/``verify`` as a c/r tool calls them: the same as the command."""
    src = loop_fs("ext4")
    out = loop_fs("ext4")
    make_every_kind(src.mount_point)
    expected = describe_tree(src.mount_point, metadata=True)
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(out.mount_point)})
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="api1")
    assert snapcore.verify("api1", state_dir=state_dir).ok
    heard: list[snapcore.MountRestored] = []
    done = snapcore.restore("api1", to=tmp_path / "r", state_dir=state_dir, on_restored=heard.append)
    assert done == heard and [d.mount for d in done] == [str(src.mount_point)] and done[0].set_aside_id is None
    assert describe_tree(tmp_path / "r", metadata=True) == expected
    export_dir = out.mount_point / manifest.id
    found = snapcore.verify(from_dir=export_dir)
    assert found.ok and found.checkpoint_id == "api1"
    archive = next(export_dir.glob("*.tar"))
    with archive.open("r+b") as f:  # one byte changed in the middle
        f.seek(archive.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    found = snapcore.verify(from_dir=export_dir)
    assert not found.ok and any("sha256 mismatch" in p for p in found.problems)
    with pytest.raises(snapcore.SnapcoreError):
        snapcore.restore(from_dir=export_dir, to=tmp_path / "r2")
    assert not (tmp_path / "r2").exists() or not any((tmp_path / "r2").iterdir())
