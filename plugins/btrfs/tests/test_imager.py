"""The ``btrfs`` imager on real loop-backed btrfs: probe, snapshot, list, discard, restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import btrfsutil
import pytest
from btrfs_testlib import (  # the fixtures are used by name
    SNAPSHOTS,
    Subvol,
    SubvolFactory,
    mount,
    populate,
)

import snapcore
from snapcore import CheckpointFailed, Consistency, Plugins, find_mount
from snapcore.testing import LoopFactory, Pace, describe_tree, wait_for_path
from snapcore.testing.trees import assert_same_tree, make_every_kind
from snapcore_btrfs import images, markers, restore, rollback

# the fixtures (btrfs_subvol, no_leftover_mounts; plugins and write_policy are snapcore.testing's)
pytest_plugins = ["btrfs_fixtures"]


def _mount(path: Path) -> snapcore.Mount:
    return find_mount(path)


def test_probe_names_the_subvolume(btrfs_subvol: SubvolFactory, plugins: Plugins) -> None:
    sv = btrfs_subvol()
    answer = plugins.probe("btrfs", _mount(sv.path))
    assert answer is not None and answer.ok
    assert "/@data" in answer.reason and "id 256" in answer.reason
    assert answer.score > plugins.probe("fsfreeze", _mount(sv.path)).score  # type: ignore[union-attr]


def test_probe_says_no_for_a_plain_directory(btrfs_subvol: SubvolFactory, plugins: Plugins, tmp_path: Path) -> None:
    sv = btrfs_subvol()
    (sv.path / "dir").mkdir()
    bind = mount(["--bind", str(sv.path / "dir")], tmp_path / "bind", sv.fs)
    answer = plugins.probe("btrfs", _mount(bind))
    assert answer is not None and not answer.ok
    assert "plain directory inside subvolume /@data" in answer.reason


def test_probe_says_no_for_ext4_and_read_only(
    loop_fs: LoopFactory, btrfs_subvol: SubvolFactory, plugins: Plugins
) -> None:
    ext4 = loop_fs("ext4")
    answer = plugins.probe("btrfs", _mount(ext4.mount_point))
    assert answer is not None and not answer.ok and "not btrfs" in answer.reason
    ro = btrfs_subvol(ro=True)
    answer = plugins.probe("btrfs", _mount(ro.path))
    assert answer is not None and not answer.ok and "read-only" in answer.reason


def test_snapshot_is_the_tree_at_checkpoint_time_while_writes_go_on(
    btrfs_subvol: SubvolFactory, state_dir: Path, pace: Pace
) -> None:
    sv = btrfs_subvol()
    populate(sv.path)
    (sv.path / "w").mkdir()  # before the writer starts: it writes there at once
    # a writer that keeps going through the checkpoint: f<n> first, then 'last' = n
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os,sys\nd=sys.argv[1]\nn=0\nwhile True:\n"
            " open(f'{d}/w/f{n}','w').write(str(n)*100)\n"
            " open(f'{d}/w/.last','w').write(str(n)); os.replace(f'{d}/w/.last', f'{d}/w/last')\n"
            " n+=1\n",
            str(sv.path),
        ]
    )
    try:
        wait_for_path(sv.path / "w" / "last", writer, pace.seconds(30), "the writer's first file")
        seen: dict[bytes, tuple[Any, ...]] = {}

        def payload(_: object) -> int:
            # runs once the image exists: it must already be the checkpoint-time tree
            seen.update(describe_tree(sv.path / "docs", skip=SNAPSHOTS))
            return 0

        before = describe_tree(sv.path / "docs", skip=SNAPSHOTS)
        manifest = snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="c1", payload=payload)
    finally:
        writer.kill()
        writer.wait()
    (sv.path / "docs" / "f0.txt").write_text("changed after the checkpoint")
    (sv.path / "docs" / "f1.txt").unlink()
    [target] = manifest.targets
    # btrfs cannot snapshot a frozen filesystem: a write racing with the snapshot ioctl
    # may land with its metadata but not its data, so the label is honest about it
    assert target.imager == "btrfs" and target.consistency == Consistency.CRASH_CONSISTENT.value
    image = Path(target.image or "")
    assert image == sv.path / ".snapshots" / "c1"
    assert describe_tree(image / "docs", skip=SNAPSHOTS) == before == seen
    assert btrfsutil.get_subvolume_read_only(str(image))
    # the concurrent writer: names without gaps, and the complete files form a prefix
    numbers = sorted(int(p.name[1:]) for p in (image / "w").iterdir() if p.name.startswith("f"))
    assert numbers == list(range(len(numbers)))
    complete = [(image / "w" / f"f{k}").read_text() == str(k) * 100 for k in numbers]
    assert complete == sorted(complete, reverse=True)
    assert target.timings["snapshot"] < pace.seconds(1.0) * 1000


def test_nested_subvolumes_warned_or_recursive(btrfs_subvol: SubvolFactory, state_dir: Path, write_policy) -> None:  # type: ignore[no-untyped-def]
    sv = btrfs_subvol()
    btrfsutil.create_subvolume(str(sv.path / "inner"))
    (sv.path / "inner" / "a.txt").write_text("inner")
    (sv.path / "sub").mkdir()
    btrfsutil.create_subvolume(str(sv.path / "sub" / "deep"))
    (sv.path / "sub" / "deep" / "b.txt").write_text("deep")
    manifest = snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="plain")
    [t] = manifest.targets
    assert any("inner" in w and "sub/deep" in w and "recursive: true" in w for w in t.warnings)
    assert os.listdir(Path(t.image or "") / "inner") == []  # only the placeholder
    # a second checkpoint must not count the first snapshot as a nested subvolume
    policy = write_policy(
        f"version: 1\nmounts:\n  {sv.path}:\n    imager: btrfs\n    options:\n      btrfs: {{recursive: true}}\n"
    )
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="rec")
    [t] = manifest.targets
    image = Path(t.image or "")
    assert (image / "inner" / "a.txt").read_text() == "inner"
    assert (image / "sub" / "deep" / "b.txt").read_text() == "deep"
    assert btrfsutil.get_subvolume_read_only(str(image / "sub" / "deep"))
    assert os.listdir(image / ".snapshots") == ["plain"] or set(os.listdir(image / ".snapshots")) <= {
        "plain",
        "plain.snapcore.json",
    }
    assert any("one after another" in w for w in t.warnings)
    images.delete_image(image)
    assert not image.exists()


def test_several_btrfs_mounts_in_one_checkpoint_api(btrfs_subvol: SubvolFactory, state_dir: Path, pace: Pace) -> None:
    a = btrfs_subvol()
    b = btrfs_subvol(fs=a.fs, name="@b")  # same filesystem, another subvolume
    c = btrfs_subvol()  # another filesystem
    for sv in (a, b, c):
        sv.write("id", sv.name + str(sv.path))
    manifest = snapcore.checkpoint([a.path, b.path, c.path], state_dir=state_dir, checkpoint_id="many")
    assert manifest.outcome == "ok"
    assert [t.mount for t in manifest.targets] == [str(a.path), str(b.path), str(c.path)]
    created = []
    for sv, t in zip((a, b, c), manifest.targets, strict=True):
        assert t.outcome == "ok" and t.consistency == "crash-consistent" and t.imager == "btrfs"
        assert (Path(t.image or "") / "id").read_text() == sv.name + str(sv.path)
        assert "freeze" in t.timings
        created.append(t.image_record["details"]["created"])  # type: ignore[index]
    # imaged in parallel: all within a small window of each other
    assert max(created) - min(created) < pace.seconds(0.5)
    assert manifest.freeze_window_ms is not None and manifest.freeze_window_ms < pace.seconds(1.0) * 1000


def test_list_and_discard_only_what_snapcore_made(
    btrfs_subvol: SubvolFactory, state_dir: Path, plugins: Plugins
) -> None:
    sv = btrfs_subvol()
    snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="one")
    snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="two")
    # someone else's snapshot in the same directory, and one that claims a marker falsely
    btrfsutil.create_snapshot(str(sv.path), str(sv.path / ".snapshots" / "theirs"), read_only=True)
    btrfsutil.create_snapshot(str(sv.path), str(sv.path / ".snapshots" / "fake"), read_only=True)
    marker = json.loads((sv.path / ".snapshots" / "one.snapcore.json").read_text())
    (sv.path / ".snapshots" / "fake.snapcore.json").write_text(json.dumps({**marker, "checkpoint_id": "fake"}))
    listed = plugins.list_images("btrfs", _mount(sv.path))
    assert [e.checkpoint_id for e in listed] == ["two", "one"]
    assert all(e.backend == "btrfs" and e.created for e in listed)
    for name in ("theirs", "fake"):
        with pytest.raises(snapcore.BackendError, match="not a snapshot snapcore made"):
            images.delete_image(sv.path / ".snapshots" / name)
        assert (sv.path / ".snapshots" / name).exists()
    assert images.delete_image(sv.path / ".snapshots" / "one")
    assert not (sv.path / ".snapshots" / "one.snapcore.json").exists()
    assert not images.delete_image(sv.path / ".snapshots" / "one")  # idempotent
    assert [e.checkpoint_id for e in plugins.list_images("btrfs", _mount(sv.path))] == ["two"]


def test_restore_to_new_and_empty_dirs(btrfs_subvol: SubvolFactory, state_dir: Path, loop_fs: LoopFactory) -> None:
    sv = btrfs_subvol()
    populate(sv.path)
    before = describe_tree(sv.path, skip=SNAPSHOTS)
    snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="r1")
    (sv.path / "big.bin").unlink()
    image = sv.path / ".snapshots" / "r1"
    dest = sv.fs.mount_point / "restored" / "here"
    assert "restored to" in restore.restore_to(image, dest)
    assert describe_tree(dest, skip=SNAPSHOTS) == before
    (dest / "new").write_text("writable")
    empty = sv.fs.mount_point / "empty"
    empty.mkdir()
    restore.restore_to(image, empty)
    assert describe_tree(empty, skip=SNAPSHOTS) == before
    with pytest.raises(snapcore.BackendError, match="not empty"):
        restore.restore_to(image, dest)


def test_restore_to_another_filesystem_copies_everything(
    btrfs_subvol: SubvolFactory, state_dir: Path, loop_fs: LoopFactory
) -> None:
    """``restore --to DIR`` on another filesystem (ext4) copies the snapshot with every
    kind of file, owners, modes, times, xattrs, ACLs, hard links and holes kept; on the
    snapshot's own btrfs it stays a writable snapshot."""
    sv = btrfs_subvol()
    make_every_kind(sv.path)
    before = describe_tree(sv.path, skip=SNAPSHOTS, metadata=True)
    snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="c1")
    (sv.path / "small.txt").write_text("changed after the checkpoint\n")
    other = loop_fs("ext4")
    dest = other.mount_point / "restored" / "c1"
    [done] = snapcore.restore("c1", to=dest, state_dir=state_dir)
    assert "a copy of" in done.message, done.message
    assert_same_tree(dest, before, skip=SNAPSHOTS)
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no staging left
    same = sv.fs.mount_point / "same-fs"
    [done] = snapcore.restore("c1", to=same, state_dir=state_dir)
    assert "writable snapshot" in done.message and btrfsutil.is_subvolume(str(same))


def test_a_copy_that_fails_leaves_nothing(btrfs_subvol: SubvolFactory, state_dir: Path, loop_fs: LoopFactory) -> None:
    """The target filesystem fills up during the copy (for real: 24 MiB into a 16 MiB
    ext4): the restore fails naming why, and neither the directory nor a partial copy
    is left."""
    sv = btrfs_subvol()
    (sv.path / "big.bin").write_bytes(os.urandom(24 << 20))
    snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="full")
    small = loop_fs("ext4", size_mb=16)
    dest = small.mount_point / "here"
    with pytest.raises(snapcore.SnapcoreError, match="No space left"):
        snapcore.restore("full", to=dest, state_dir=state_dir)
    assert sorted(p.name for p in small.mount_point.iterdir()) == ["lost+found"]


@pytest.mark.usefixtures("no_leftover_mounts")
def test_restore_in_place_keeps_the_old_subvolume(btrfs_subvol: SubvolFactory, state_dir: Path) -> None:
    sv = btrfs_subvol()
    populate(sv.path)
    btrfsutil.create_subvolume(str(sv.path / "nested"))
    (sv.path / "nested" / "n.txt").write_text("nested stays current")
    before = describe_tree(sv.path, skip=(".snapshots", "nested"))
    manifest = snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="r1")
    snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="r2")
    (sv.path / "big.bin").unlink()
    (sv.path / "after.txt").write_text("written after")
    (sv.path / "nested" / "n.txt").write_text("nested changed")
    image = Path(manifest.targets[0].image or "")
    done = rollback.rollback(_mount(sv.path), "r1", image=image)
    assert "mounted again" in done.message
    assert describe_tree(sv.path, skip=(".snapshots", "nested")) == before
    assert not (sv.path / "after.txt").exists()
    # nested subvolumes and the snapshots came along, so images stay where the manifests say
    assert (sv.path / "nested" / "n.txt").read_text() == "nested changed"
    assert markers.recognise(sv.path / ".snapshots" / "r1") is not None
    assert markers.recognise(sv.path / ".snapshots" / "r2") is not None
    # the replaced state is an image of its own in the snapshot_dir, read-only and marked
    assert done.set_aside is not None and done.set_aside_id and done.set_aside_id.startswith("before-restore-")
    aside = sv.path / ".snapshots" / done.set_aside_id
    assert done.set_aside.ref == str(aside) and str(aside) in done.message
    assert markers.recognise(aside) is not None and btrfsutil.get_subvolume_read_only(str(aside))
    assert (aside / "after.txt").read_text() == "written after"
    assert not [n for n in os.listdir(sv.fs.mount_point) if ".snapcore-" in n]
    # a second restore a moment later keeps a second, differently named state
    again = rollback.rollback(_mount(sv.path), "r1", image=image)
    assert again.set_aside_id and again.set_aside_id != done.set_aside_id
    assert markers.recognise(sv.path / ".snapshots" / again.set_aside_id) is not None


def _image_of_old_then_new(sv: Subvol, state_dir: Path, checkpoint_id: str) -> Path:
    """The image of a checkpoint taken while ``a`` held "old"; ``a`` holds "new" now."""
    sv.write("a", "old")
    manifest = snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id=checkpoint_id)
    sv.write("a", "new")
    return Path(manifest.targets[0].image or "")


@pytest.mark.usefixtures("no_leftover_mounts")
def test_restore_in_place_busy_mount_and_refusals(
    btrfs_subvol: SubvolFactory, state_dir: Path, loop_fs: LoopFactory
) -> None:
    sv = btrfs_subvol()
    image = _image_of_old_then_new(sv, state_dir, "b1")
    subvol_id = btrfsutil.subvolume_id(str(sv.path))
    with open(sv.path / "a") as busy:
        # a mount in use cannot show the restored state now: refused, naming the holder
        with pytest.raises(snapcore.MountBusy, match=rf"pid {os.getpid()} \(.*fd {busy.fileno()} \({sv.path}/a\)"):
            rollback.rollback(_mount(sv.path), "b1", image=image)
        assert busy.read() == "new"
    # nothing changed: the same subvolume, nothing staged or set aside
    assert btrfsutil.subvolume_id(str(sv.path)) == subvol_id
    assert not [n for n in os.listdir(sv.fs.mount_point) if ".snapcore-" in n]
    assert sorted(os.listdir(sv.path / ".snapshots")) == ["b1", "b1.snapcore.json"]
    # a mount stacked below it holds it too
    below = sv.path / "below"
    below.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(below)], check=True)
    try:
        with pytest.raises(snapcore.MountBusy, match=f"{below} is mounted below it"):
            rollback.rollback(_mount(sv.path), "b1", image=image)
    finally:
        subprocess.run(["umount", str(below)], check=True)
    assert (sv.path / "a").read_text() == "new"
    rollback.rollback(_mount(sv.path), "b1", image=image)
    assert (sv.path / "a").read_text() == "old"
    # the top-level subvolume cannot be replaced
    top = sv.fs.mount_point
    manifest = snapcore.checkpoint([top], state_dir=state_dir, checkpoint_id="t1")
    with pytest.raises(snapcore.BackendError, match="top-level subvolume"):
        rollback.rollback(_mount(top), "t1", image=Path(manifest.targets[0].image or ""))
    # not a snapcore image
    btrfsutil.create_snapshot(str(sv.path), str(sv.path / "foreign"), read_only=True)
    with pytest.raises(snapcore.BackendError, match="not a snapshot snapcore made"):
        rollback.rollback(_mount(sv.path), "b1", image=sv.path / "foreign")


@pytest.mark.usefixtures("no_leftover_mounts")
def test_restore_in_place_undoes_the_swap_when_a_holder_comes_after_the_check_fake_race(
    btrfs_subvol: SubvolFactory, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between the holder check and the unmount cannot be hit on purpose:
    the check is made to see nobody (the fake) while a file is really held open, so
    the real umount fails after the swap, which must be undone."""
    sv = btrfs_subvol()
    btrfsutil.create_subvolume(str(sv.path / "nested"))
    (sv.path / "nested" / "n.txt").write_text("nested")
    image = _image_of_old_then_new(sv, state_dir, "u1")
    subvol_id = btrfsutil.subvolume_id(str(sv.path))
    seen: Iterator[list[object]] = iter([[], []])  # the check before the swap, then the one for the message
    monkeypatch.setattr(rollback, "mount_holders", lambda mp: next(seen))
    with open(sv.path / "a") as busy, pytest.raises(snapcore.MountBusy, match="target is busy"):
        rollback.rollback(_mount(sv.path), "u1", image=image)
    assert busy.closed
    assert btrfsutil.subvolume_id(str(sv.path)) == subvol_id
    assert (sv.path / "a").read_text() == "new" and (sv.path / "nested" / "n.txt").read_text() == "nested"
    assert not [n for n in os.listdir(sv.fs.mount_point) if ".snapcore-" in n]
    # and with the holder gone, the same restore works
    monkeypatch.undo()
    rollback.rollback(_mount(sv.path), "u1", image=image)
    assert (sv.path / "a").read_text() == "old" and (sv.path / "nested" / "n.txt").read_text() == "nested"


def test_errors_no_space(btrfs_subvol: SubvolFactory, state_dir: Path) -> None:
    sv = btrfs_subvol(mkfs_args=("--mixed",))
    (sv.path / ".snapshots").mkdir()
    with pytest.raises(OSError), open(sv.path / "fill", "wb") as f:
        while True:
            f.write(b"\xff" * (1 << 20))
    with pytest.raises(CheckpointFailed, match="no space left") as info:
        snapcore.checkpoint([sv.path], state_dir=state_dir, checkpoint_id="full")
    assert info.value.manifest.outcome == "failed"  # type: ignore[attr-defined]
    assert os.listdir(sv.path / ".snapshots") == []


def test_errors_snapshot_dir(btrfs_subvol: SubvolFactory, state_dir: Path, write_policy, loop_fs: LoopFactory) -> None:  # type: ignore[no-untyped-def]
    sv = btrfs_subvol()
    other = loop_fs("btrfs")
    policy = write_policy(
        f"version: 1\nmounts:\n  {sv.path}:\n    imager: btrfs\n"
        f"    options:\n      btrfs: {{snapshot_dir: {other.mount_point}/snaps}}\n"
    )
    with pytest.raises(CheckpointFailed, match="on another filesystem"):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="x1")
    assert not (other.mount_point / "snaps").exists()
    (sv.path / "afile").write_text("")
    policy = write_policy(
        f"version: 1\nmounts:\n  {sv.path}:\n    imager: btrfs\n"
        f"    options:\n      btrfs: {{snapshot_dir: {sv.path}/afile}}\n"
    )
    with pytest.raises(CheckpointFailed, match="exists and is not a directory"):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="x2")
    # a snapshot_dir elsewhere on the same filesystem is fine
    policy = write_policy(
        f"version: 1\nmounts:\n  {sv.path}:\n    imager: btrfs\n"
        f"    options:\n      btrfs: {{snapshot_dir: {sv.fs.mount_point}/snaps}}\n"
    )
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="x3")
    assert manifest.targets[0].image == f"{sv.fs.mount_point}/snaps/x3"


@pytest.mark.usefixtures("no_leftover_mounts")
def test_restore_in_place_refuses_a_mount_pinned_by_subvolid_in_fstab(
    btrfs_subvol: SubvolFactory, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sv = btrfs_subvol()
    image = _image_of_old_then_new(sv, state_dir, "f1")
    fstab = tmp_path / "fstab"
    subvol_id = btrfsutil.subvolume_id(str(sv.path))
    fstab.write_text(f"# a comment line\nUUID=x {sv.path} btrfs defaults,subvolid={subvol_id},noatime 0 0\n")
    monkeypatch.setattr(rollback, "FSTAB", str(fstab))
    with pytest.raises(snapcore.BackendError, match=f"subvolid={subvol_id}.*subvol=/@data"):
        rollback.rollback(_mount(sv.path), "f1", image=image)
    # nothing changed: the same subvolume, the same data, nothing set aside
    assert btrfsutil.subvolume_id(str(sv.path)) == subvol_id
    assert (sv.path / "a").read_text() == "new"
    assert not [n for n in os.listdir(sv.fs.mount_point) if ".snapcore-" in n]
    # by name, the next mount finds the restored subvolume: allowed
    fstab.write_text(f"UUID=x {sv.path} btrfs defaults,subvol=/@data 0 0\n")
    where = rollback.rollback(_mount(sv.path), "f1", image=image)
    assert "rolled back in place" in where.message
    assert (sv.path / "a").read_text() == "old"


def _delalloc(path: Path) -> bool:
    """Does ``path`` still have extents waiting for write-back (FIEMAP, via filefrag)?"""
    out = subprocess.run(["filefrag", "-v", str(path)], check=True, capture_output=True, text=True).stdout
    return "delalloc" in out


@pytest.mark.parametrize("sync", [True, False])
def test_prepare_writes_back_unless_told_not_to(btrfs_subvol: SubvolFactory, plugins: Plugins, sync: bool) -> None:
    sv = btrfs_subvol()
    data = sv.path / "unwritten"
    data.write_bytes(os.urandom(1 << 20))  # buffered: the kernel writes it back in ~30 s
    assert _delalloc(data)
    target = snapcore.Target(
        checkpoint_id="prep", mount=_mount(sv.path), imager="btrfs", options={"btrfs": {"sync": sync}}
    )
    plugins.prepare("btrfs", target, snapcore.Role.IMAGER)
    assert _delalloc(data) is not sync
