from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from snapcore.errors import UnsupportedMount, UsageError
from snapcore.host.mounts import MountTable, freeze_levels, parse_mountinfo_line, resolve_paths, unescape
from snapcore.testing import LoopFactory

LINE = "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw,errors=continue"


def test_parse_line_with_escape_and_optional_fields() -> None:
    m = parse_mountinfo_line(LINE)
    assert m.mount_id == 36 and m.parent_id == 35
    assert (m.major, m.minor) == (98, 0)
    assert m.root == "/mnt1"
    assert m.mount_point == "/mnt/my disk"
    assert m.fstype == "ext3" and m.source == "/dev/root"
    assert m.mount_options == ("rw", "noatime")
    assert m.super_option("errors") == "continue"


def test_parse_btrfs_subvol_and_backslash() -> None:
    line = (
        "50 1 0:45 /@home /home\\134x rw,relatime shared:5 - btrfs /dev/sda2 "
        "rw,space_cache=v2,subvolid=257,subvol=/@home"
    )
    m = parse_mountinfo_line(line)
    assert m.mount_point == "/home\\x"
    assert m.super_option("subvol") == "/@home"
    assert m.super_option("subvolid") == "257"
    assert m.super_option("nope") is None


def test_unescape_leaves_plain_text() -> None:
    assert unescape("/plain") == "/plain"
    assert unescape("/a\\011b") == "/a\tb"


def test_malformed_line() -> None:
    with pytest.raises(ValueError):
        parse_mountinfo_line("1 2 3:4 / /x rw")


def test_pseudo_filesystem_is_refused() -> None:
    with pytest.raises(UnsupportedMount, match="proc pseudo filesystem"):
        MountTable.read().target_mount("/proc/self")


def test_missing_path() -> None:
    with pytest.raises(UsageError, match="no such file"):
        resolve_paths(MountTable.read(), ["/nonexistent/snapcore"])


def test_loop_mount_is_enriched(loop_fs: LoopFactory) -> None:
    fs = loop_fs("ext4")
    (fs.mount_point / "dir").mkdir()
    table = MountTable.read()
    m = table.find(fs.mount_point / "dir")
    assert m.mount_point == str(fs.mount_point)
    assert m.fstype == "ext4"
    assert m.devnode == fs.device
    assert m.loop_backing_file == str(fs.image)


def test_btrfs_anonymous_device_resolves_to_loop(loop_fs: LoopFactory) -> None:
    fs = loop_fs("btrfs")
    m = MountTable.read().find(fs.mount_point)
    assert m.major == 0  # btrfs reports an anonymous device
    assert m.devnode == fs.device
    assert m.loop_backing_file == str(fs.image)


def test_overmounted_path_resolves_to_the_last_mount(loop_fs: LoopFactory, tmp_path: Path) -> None:
    first = loop_fs("ext4")
    second = loop_fs("ext4", mount_point=tmp_path / "over")
    # mount the second filesystem again on top of the first one's mount point
    subprocess.run(["mount", "--bind", str(second.mount_point), str(first.mount_point)], check=True)
    try:
        m = MountTable.read().find(first.mount_point)
        assert m.devnode == second.device
    finally:
        subprocess.run(["umount", str(first.mount_point)], check=True)
    assert MountTable.read().find(first.mount_point).devnode == first.device


def test_bind_mount_of_subdirectory(loop_fs: LoopFactory, tmp_path: Path) -> None:
    fs = loop_fs("ext4")
    (fs.mount_point / "sub").mkdir()
    bind = tmp_path / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(fs.mount_point / "sub"), str(bind)], check=True)
    try:
        m = MountTable.read().find(bind)
        assert m.mount_point == str(bind)
        assert m.root == "/sub"
        assert m.devnode == fs.device
    finally:
        subprocess.run(["umount", str(bind)], check=True)


def test_freeze_levels_put_the_loop_file_holder_last(loop_fs: LoopFactory) -> None:
    outer = loop_fs("ext4", size_mb=64)
    inner_factory = LoopFactory(outer.mount_point)
    try:
        inner = inner_factory("ext4")  # its image file lives on `outer`
        nested = loop_fs("ext4", mount_point=outer.mount_point / "nested")
        table = MountTable.read()
        mounts = resolve_paths(table, [outer.mount_point, inner.mount_point, nested.mount_point])
        levels = freeze_levels(table, mounts)
        names = [[m.mount_point for m in level] for level in levels]
        assert str(outer.mount_point) in names[-1]
        assert str(inner.mount_point) not in names[-1]
        assert str(nested.mount_point) not in names[-1]
        assert len(names) == 2
    finally:
        inner_factory.close()
