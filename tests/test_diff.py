"""``snapcore diff ID1 [ID2]`` (issue 20 B3): what changed between two checkpoints of a
mount, or between one and the live tree, in ``snapper status``'s letters, read from
real btrfs snapshots and the live subvolume."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapcore.cli import main
from snapcore.testing import LoopFactory

pytestmark = pytest.mark.usefixtures("root_only")


@dataclass
class Cli:
    """``snapcore`` with the test's state directory, plugins and policies."""

    state_dir: Path
    write_policy: Any
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    def policy(self, plugins: str, text: str) -> Path:
        self.monkeypatch.setenv("SNAPCORE_PLUGINS", plugins)
        return Path(self.write_policy(text))

    def run(self, *args: str) -> int:
        return main(["--state-dir", str(self.state_dir), *args])

    def checkpoint(self, policy: Path, checkpoint_id: str) -> None:
        assert self.run("checkpoint", "--policy", str(policy), "--id", checkpoint_id) == 0
        self.capsys.readouterr()

    def diff(self, *args: str) -> dict[str, str]:
        assert self.run("diff", *args, "--json") == 0
        [result] = json.loads(self.capsys.readouterr().out)
        return {c["path"]: c["what"] for c in result["changes"]}


@pytest.fixture
def cli(
    state_dir: Path, write_policy: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    return Cli(state_dir, write_policy, monkeypatch, capsys)


def test_diff_names_every_kind_of_change(loop_fs: LoopFactory, tmp_path: Path, cli: Cli) -> None:
    sv = loop_fs("btrfs").mount_subvolume("data", tmp_path / "data")
    policy = cli.policy("btrfs", f"version: 1\nmounts:\n  {sv}:\n    imager: btrfs\n")
    for name in ("same", "content", "mode", "owner", "xattr", "acl", "gone", "kind"):
        (sv / name).write_text(f"{name}\n")
    (sv / "dir").mkdir()
    os.symlink("same", sv / "link")
    cli.checkpoint(policy, "c1")

    (sv / "content").write_text("other bytes\n")
    os.chmod(sv / "mode", 0o600)
    os.chown(sv / "owner", 1234, 5678)
    os.setxattr(sv / "xattr", "user.note", b"x")
    subprocess.run(["setfacl", "-m", "u:1234:rw", str(sv / "acl")], check=True)
    (sv / "gone").unlink()
    (sv / "kind").unlink()
    (sv / "kind").mkdir()
    os.unlink(sv / "link")
    os.symlink("content", sv / "link")
    (sv / "dir" / "new").write_text("new\n")
    os.utime(sv / "same", ns=(1, 2))  # touched, the same bytes: no content change
    cli.checkpoint(policy, "c2")

    changes = cli.diff("c1", "c2")
    assert changes == {
        "content": "c",
        "mode": "p",
        "owner": "ug",
        "xattr": "x",
        "acl": "pa",  # setfacl also widens the group bits (the ACL's mask)
        "gone": "-",
        "kind": "t",
        "link": "c",
        "dir/new": "+",  # the directory itself is not listed: only what changed inside it
    }, changes

    # against the live tree, after the second checkpoint
    (sv / "later").write_text("later\n")
    (sv / "content").write_text("c1 had other bytes\n")
    assert cli.diff("c2") == {"later": "+", "content": "c"}

    # the text form, and an unknown checkpoint
    assert cli.run("diff", "c1", "c2") == 0
    out = cli.capsys.readouterr().out
    assert f"{sv}: c1 -> c2, 9 change(s)" in out and "  +       dir/new" in out
    assert cli.run("diff", "nosuch") == 2


def _export_policy(cli: Cli, mount: Path, exporter: str, dest: Path) -> Path:
    dest.mkdir()
    return cli.policy(
        f"fsfreeze,{exporter}",
        f"version: 1\nmounts:\n  {mount}:\n    imager: fsfreeze\n    exporter: {exporter}\n"
        f"    options:\n      {exporter}: {{dest: {dest}}}\n",
    )


def test_a_checkpoint_without_a_tree_to_read_is_named(loop_fs: LoopFactory, tmp_path: Path, cli: Cli) -> None:
    """A tar export is an archive, not a tree: exit 2, saying what diff reads."""
    fs = loop_fs("ext4")
    cli.checkpoint(_export_policy(cli, fs.mount_point, "tar", tmp_path / "exports"), "t1")
    assert cli.run("diff", "t1") == 2
    err = cli.capsys.readouterr().err
    assert "no directory tree to compare" in err and "btrfs snapshots and rsync exports" in err, err


def test_diff_reads_rsync_exports(loop_fs: LoopFactory, tmp_path: Path, cli: Cli) -> None:
    """fsfreeze keeps no image: the rsync export's tree is what each checkpoint holds."""
    fs = loop_fs("ext4")
    policy = _export_policy(cli, fs.mount_point, "rsync", tmp_path / "exports")
    (fs.mount_point / "kept").write_text("one\n")
    cli.checkpoint(policy, "r1")
    (fs.mount_point / "kept").write_text("two, longer\n")
    (fs.mount_point / "added").write_text("new\n")
    cli.checkpoint(policy, "r2")
    assert cli.diff("r1", "r2") == {"kept": "c", "added": "+"}
