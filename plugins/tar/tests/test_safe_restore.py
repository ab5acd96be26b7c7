"""``restore --safe``: an export of unknown origin restored without device nodes,
FIFOs, sockets, setuid/setgid bits or file capabilities; everything else as it was."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

import pytest
from tar_helpers import exporter_policy, make_every_kind

import snapcore
from snapcore import main
from snapcore.testing import LoopFactory, describe_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems and device nodes need root")

SPECIAL_KINDS = {stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
#: A valid ``security.capability`` (VFS_CAP_REVISION_2, effective): CAP_NET_RAW.
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)

SETID = {b"dir/setuid-tool": 0o755, b"dir/setgid-tool": 0o755}


def _dangerous_tree(root: Path) -> None:
    make_every_kind(root)  # char-dev, block-dev, fifo
    for name, mode in (("setuid-tool", 0o4755), ("setgid-tool", 0o2755)):
        (root / "dir" / name).write_text("#!/bin/sh\n")
        os.chmod(root / "dir" / name, mode)
    (root / "capable").write_text("ping\n")
    os.setxattr(root / "capable", "security.capability", CAP_NET_RAW)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(root / "sock"))


@pytest.mark.parametrize("exporter", ["tar", "rsync"])
def test_safe_restore_defuses_and_keeps_the_rest(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, exporter: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4", size_mb=96)
    out = loop_fs("ext4", size_mb=128)
    _dangerous_tree(src.mount_point)
    expected = describe_tree(src.mount_point, metadata=True)
    dest = out.mount_point / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, exporter, {"dest": str(dest)})
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="s1")
    capsys.readouterr()

    faithful = out.mount_point / "faithful"
    assert main(["restore", "--from", str(dest / "s1"), "--to", str(faithful)]) == 0
    assert os.getxattr(faithful / "capable", "security.capability") == CAP_NET_RAW
    assert stat.S_ISBLK(os.lstat(faithful / "block-dev").st_mode)  # by default, as it was
    special = {
        rel for rel, desc in describe_tree(faithful, metadata=True).items() if stat.S_IFMT(desc[0]) in SPECIAL_KINDS
    }
    assert {b"char-dev", b"block-dev", b"fifo"} <= special  # and a socket where rsync copies it (tar skips them)

    safe = out.mount_point / "safe"
    assert main(["restore", "--from", str(dest / "s1"), "--to", str(safe), "--safe"]) == 0

    report = capsys.readouterr().out
    assert f"safe mode: removed special files {len(special)} " in report
    assert "cleared setuid/setgid on 2" in report and "cleared file capabilities on 1" in report
    assert str(safe) in report and ".snapcore-safe-" not in report
    got = describe_tree(safe, metadata=True)
    assert set(expected) - set(got) == special | {b"sock"}
    for rel, desc in got.items():
        if rel in SETID:
            assert stat.S_IMODE(desc[0]) == SETID[rel], rel
            assert desc[1:] == expected[rel][1:], rel
        elif rel == b"capable":
            assert desc[:-2] == expected[rel][:-2]
            assert "security.capability" not in dict(desc[-2])
        elif rel != b".":
            assert desc == expected[rel], rel
    assert not any(n.startswith(".snapcore-safe-") for n in os.listdir(out.mount_point))


def test_safe_needs_a_copy_and_a_new_directory(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = loop_fs("ext4", size_mb=64)
    src.write("f", "f")
    dest = tmp_path / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest)})
    snapcore.checkpoint(policy=policy, state_dir=state_dir, checkpoint_id="n1")
    capsys.readouterr()
    assert main(["--state-dir", str(state_dir), "restore", "n1", "--in-place", "--safe"]) == 2
    assert "--safe restores a copy: use it with --to DIR" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine").write_text("keep me")
    assert main(["restore", "--from", str(dest / "n1"), "--to", str(busy), "--safe"]) == 1
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert (busy / "mine").read_text() == "keep me" and os.listdir(busy) == ["mine"]
    assert not any(n.startswith(".snapcore-safe-") for n in os.listdir(tmp_path))
