"""The fsfreeze backend on real loop filesystems."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from snapcore import BackendError, FrozenElsewhere, Role, Target, find_mount, make_plugins, syncfs
from snapcore.contract import BackendContract
from snapcore.testing import LoopFactory, Pace, assert_not_frozen, start_write, thaw_quietly
from snapcore_fsfreeze.backend import Freezer, freezable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="FIFREEZE needs root")


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_freeze_blocks_writes_until_thaw(loop_fs: LoopFactory, fstype: str, pace: Pace) -> None:
    fs = loop_fs(fstype)
    freezer = Freezer()
    freezer.freeze("k", str(fs.mount_point))
    try:
        assert freezer.is_frozen("k")
        probe = start_write(fs.mount_point / "f")
        assert not probe.done(pace.seconds(0.3))
        # reading a frozen filesystem works
        assert sorted(os.listdir(fs.mount_point)) is not None
    finally:
        assert freezer.thaw("k")
    assert probe.done(pace.seconds(10))
    assert not freezer.thaw("k"), "a second thaw is a no-op"


def test_ebusy_is_frozen_elsewhere_and_not_thawed(loop_fs: LoopFactory, pace: Pace) -> None:
    fs = loop_fs("ext4")
    subprocess.run(["fsfreeze", "-f", str(fs.mount_point)], check=True)
    try:
        with pytest.raises(FrozenElsewhere, match="EBUSY"):
            Freezer().freeze("k", str(fs.mount_point))
        assert not start_write(fs.mount_point / "x").done(pace.seconds(0.3))
    finally:
        thaw_quietly(fs.mount_point)
    assert_not_frozen(fs.mount_point)


def test_thaw_after_someone_else_thawed(loop_fs: LoopFactory) -> None:
    fs = loop_fs("ext4")
    freezer = Freezer()
    freezer.freeze("k", str(fs.mount_point))
    subprocess.run(["fsfreeze", "-u", str(fs.mount_point)], check=True)
    assert freezer.thaw("k")  # EINVAL (not frozen) is not an error
    assert_not_frozen(fs.mount_point)


def test_parallel_freezes(loop_fs: LoopFactory) -> None:
    mounts = [loop_fs("ext4") for _ in range(4)]
    freezer = Freezer()
    threads = [threading.Thread(target=freezer.freeze, args=(str(m), str(m.mount_point))) for m in mounts]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(freezer.is_frozen(str(m)) for m in mounts)
    finally:
        for m in mounts:
            freezer.thaw(str(m))
    for m in mounts:
        assert_not_frozen(m.mount_point)


def test_probe(loop_fs: LoopFactory, tmp_path: Path) -> None:
    fs = loop_fs("xfs")
    plugins = make_plugins()
    answer = plugins.probe("fsfreeze", find_mount(fs.mount_point))
    assert answer is not None and answer.ok and answer.score > 0
    tmpfs = tmp_path / "t"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        answer = plugins.probe("fsfreeze", find_mount(tmpfs))
        assert answer is not None and not answer.ok
        assert "tmpfs cannot be frozen" in answer.reason
        ok, _ = freezable(find_mount(tmpfs))
        assert not ok
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def test_prepare_syncs_and_refuses_unfreezable(loop_fs: LoopFactory, tmp_path: Path) -> None:
    fs = loop_fs("ext4")
    fs.write("dirty", b"x" * (1 << 20))
    plugins = make_plugins()
    info = plugins.info("fsfreeze")
    assert info.live_image and Role.IMAGER in info.roles
    target = Target(checkpoint_id="t", mount=find_mount(fs.mount_point), imager="fsfreeze")
    plugins.prepare("fsfreeze", target, Role.IMAGER)
    # after syncfs nothing is dirty: the file's blocks are allocated on disk
    assert os.stat(fs.mount_point / "dirty").st_blocks >= 2048
    tmpfs = tmp_path / "t"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        bad = Target(checkpoint_id="t", mount=find_mount(tmpfs), imager="fsfreeze")
        with pytest.raises(BackendError, match="tmpfs cannot be frozen"):
            plugins.prepare("fsfreeze", bad, Role.IMAGER)
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)
    with pytest.raises(OSError):
        syncfs(str(tmp_path / "missing"))


def test_freeze_of_a_non_freezable_filesystem(tmp_path: Path) -> None:
    tmpfs = tmp_path / "t"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        with pytest.raises(BackendError, match="cannot be frozen"):
            Freezer().freeze("k", str(tmpfs))
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


class TestContract(BackendContract):
    imager = "fsfreeze"
    fstype = "ext4"
