"""``checkpoint --send-images`` into a local export directory: CRIU's images and the
ghost copies go beside the exporter's files, in the checkpoint's own directory (never
one another checkpoint shares), and go with the export when the checkpoint is
deleted, or discarded when it fails."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from snapcore.cli import main
from snapcore.store.export_files import SENT_MARKER, put_local, remove_put
from snapcore.tasks.criu import Criu
from snapcore.testing import LoopFactory, Pace, wait_for_path
from snapcore.types import Export

pytestmark = pytest.mark.usefixtures("root_only")

#: Holds a file it deleted (so the checkpoint has a ghost copy to send) and sleeps.
HOLDER = """
import os, sys, time
path, ready = sys.argv[1:3]
f = open(path, "w+"); f.write("held while deleted\\n"); f.flush(); os.unlink(path)
os.chdir("/")
open(ready + ".tmp", "w").close(); os.rename(ready + ".tmp", ready)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def holder(tmp_path: Path, pace: Pace) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path) -> subprocess.Popen[bytes]:
        ready = tmp_path / f"ready-{len(procs)}"
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), str(ready)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # CRIU wants a session leader
        )
        procs.append(proc)
        wait_for_path(ready, proc, pace.seconds(20), "the holder")
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


class Bed(NamedTuple):
    """What a test of sent images runs with."""

    state_dir: Path
    holder: Any
    criu: Criu
    write_policy: Any
    monkeypatch: pytest.MonkeyPatch


@pytest.fixture
def bed(state_dir: Path, holder: object, criu: Criu, write_policy: object, monkeypatch: pytest.MonkeyPatch) -> Bed:
    return Bed(state_dir, holder, criu, write_policy, monkeypatch)


def _checkpoint(state_dir: Path, policy: Path, pid: int, checkpoint_id: str, images: Path, criu: Criu) -> int:
    """``snapcore checkpoint --send-images -- criu dump --leave-running``, in a process
    of its own (a fault the test sets is read once per process); its exit code."""
    images.mkdir()
    argv = [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "checkpoint", "--policy", str(policy)]
    argv += ["--pid", str(pid), "--id", checkpoint_id, "--send-images", "--"]
    argv += [criu.path, "dump", "-t", str(pid), "-D", str(images), "--leave-running", "--log-file", "dump.log"]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False).returncode


def _manifest(state_dir: Path, checkpoint_id: str) -> dict[str, object]:
    manifest: dict[str, object] = json.loads((state_dir / "checkpoints" / checkpoint_id / "manifest.json").read_text())
    return manifest


def test_images_sent_into_a_tar_export_go_when_the_checkpoint_is_deleted(
    loop_fs: LoopFactory, tmp_path: Path, bed: Bed
) -> None:
    state_dir, holder, criu, write_policy, monkeypatch = bed
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,tar")
    fs, exports = loop_fs("ext4"), tmp_path / "exports"
    exports.mkdir()
    policy = write_policy(
        f"version: 1\nmounts:\n  {fs.mount_point}:\n    imager: fsfreeze\n    exporter: tar\n"
        f"    options:\n      tar: {{dest: {exports}}}\n"
    )
    proc = holder(fs.mount_point / "held")
    images = tmp_path / "images"
    assert _checkpoint(state_dir, policy, proc.pid, "si1", images, criu) == 0, (images / "dump.log").read_text()
    export = exports / "si1"
    [sent] = _manifest(state_dir, "si1")["criu"]["sent"]  # type: ignore[index]
    assert sent["parts"] == ["criu", "ghosts"] and sent["dir"] == str(export), sent
    assert (export / "criu" / "pstree.img").is_file()
    assert [p.read_text() for p in (export / "ghosts").iterdir()] == ["held while deleted\n"]

    assert main(["--state-dir", str(state_dir), "delete", "si1"]) == 0
    assert not export.exists(), sorted(p.name for p in export.iterdir())


def test_images_sent_into_a_shared_btrfs_send_directory_stay_apart(
    loop_fs: LoopFactory, tmp_path: Path, bed: Bed
) -> None:
    """btrfs send writes every checkpoint's stream into one directory: each
    checkpoint's images go into a directory of its own id there, so a second
    checkpoint never replaces the first's, a failed one discards only its own, and a
    delete removes only the deleted one's."""
    state_dir, holder, criu, write_policy, monkeypatch = bed
    monkeypatch.setenv("SNAPCORE_PLUGINS", "btrfs,btrfs-send")
    sv = loop_fs("btrfs").mount_subvolume("data", tmp_path / "data")
    dest = tmp_path / "streams"
    dest.mkdir()
    policy = write_policy(
        f"version: 1\nmounts:\n  {sv}:\n    imager: btrfs\n    exporter: btrfs-send\n"
        f"    options:\n      btrfs-send: {{dest: {dest}}}\n"
    )
    proc = holder(sv / "held")
    for n in (1, 2):
        images = tmp_path / f"images{n}"
        assert _checkpoint(state_dir, policy, proc.pid, f"bs{n}", images, criu) == 0, (images / "dump.log").read_text()
        assert (dest / f"bs{n}" / "criu" / "pstree.img").is_file()
    assert (dest / "bs1" / "criu" / "pstree.img").is_file()  # the second did not replace it

    # a checkpoint that fails once its images were sent: only its own go
    monkeypatch.setenv("SNAPCORE_FAULT", "finish=raise")
    assert _checkpoint(state_dir, policy, proc.pid, "bs3", tmp_path / "images3", criu) == 1
    monkeypatch.delenv("SNAPCORE_FAULT")
    assert not (dest / "bs3").exists()
    assert (dest / "bs1" / "criu").is_dir() and (dest / "bs2" / "criu").is_dir()

    assert main(["--state-dir", str(state_dir), "delete", "bs1"]) == 0
    assert not (dest / "bs1").exists()
    assert (dest / "bs2" / "criu" / "pstree.img").is_file() and (dest / "bs2" / "ghosts").is_dir()


def _put(path: str, names: list[str]) -> Export:
    """An export record as a manifest may carry it: the directory and what was put there."""
    return Export(backend="tar", ref="ref", path=path, details={"put": names})


def test_a_tampered_manifest_removes_only_what_snapcore_put_for_that_checkpoint(tmp_path: Path) -> None:
    """The names and the directory come from a manifest (untrusted): only ``criu`` and
    ``ghosts``, only where snapcore's marker names this checkpoint."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "pstree.img").write_bytes(b"x")
    exports = tmp_path / "exports"
    (exports / "c1").mkdir(parents=True)
    (exports / "c1" / "archive.tar").write_bytes(b"the exporter's")
    put_local(exports / "c1", "c1", {"criu": source})
    assert (exports / "c1" / SENT_MARKER).read_text() == "c1\n"

    assert remove_put(_put(str(exports / "c1"), ["../archive.tar", "archive.tar", "/etc"]), "c1") == []
    assert remove_put(_put(str(exports / "c1"), ["criu"]), "c2") == []  # another checkpoint's marker
    assert remove_put(_put("exports/c1", ["criu"]), "c1") == []  # not absolute
    assert (exports / "c1" / "criu" / "pstree.img").is_file()

    # no marker: a directory snapcore did not fill
    theirs = tmp_path / "theirs" / "c9"
    (theirs / "criu").mkdir(parents=True)
    assert remove_put(_put(str(theirs), ["criu"]), "c9") == [] and (theirs / "criu").is_dir()
    # the checkpoint's directory a symlink to one with its marker: not followed
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "c1").symlink_to(exports / "c1")
    assert remove_put(_put(str(tmp_path / "links" / "c1"), ["criu"]), "c1") == []
    assert (exports / "c1" / "criu").is_dir()

    assert remove_put(_put(str(exports / "c1"), ["criu", "criu"]), "c1") == [str(exports / "c1" / "criu")]
    assert sorted(p.name for p in (exports / "c1").iterdir()) == ["archive.tar"]
