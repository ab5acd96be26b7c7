"""The files a checkpoint's tasks need, checked where they are restored before the
program is started again (``check-files``, and ``restore ... -- CMD``): size, mtime
and sha256 as the tasks had them at the freeze, deleted files' ghost copies intact.
On loop filesystems with real processes holding real files; the manifest is
untrusted input (paths out of the tree are problems, never followed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapcore.tasks.digests import check_files
from snapcore.testing import LoopFactory
from snapcore.testing.processes import Holders

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems and freezing need root")


def _snapcore(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def checkpointed(
    loop_fs: LoopFactory, holder: Holders, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, dict[str, object]]:
    """A process holding files on an ext4 loop filesystem (one deleted while open, one
    appended to until the freeze), checkpointed with fsfreeze + rsync: the mount, the
    policy, the manifest."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    fs = loop_fs("ext4", size_mb=64)
    mp = fs.mount_point
    (mp / "config").write_text("setting = 1\n")
    (mp / "data.bin").write_bytes(os.urandom(300_000))
    (mp / "scratch").write_text("only the program has this\n")
    pid = holder(f"r:{mp / 'config'}", f"r:{mp / 'data.bin'}", f"r:{mp / 'scratch'}", f"cwd:{mp}")
    (mp / "scratch").unlink()
    exports = tmp_path / "exports"
    exports.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\nmounts:\n  {mp}:\n    imager: fsfreeze\n    exporter: rsync\n"
        f"    options:\n      rsync:\n        dest: {exports}\n"
    )
    done = _snapcore(state_dir, "checkpoint", "--policy", str(policy), "--pid", str(pid), "--id", "c1", "--json")
    assert done.returncode == 0, done.stderr
    return mp, policy, json.loads(done.stdout)


def test_digests_are_recorded_and_a_restored_copy_checks(
    checkpointed: tuple[Path, Path, dict[str, object]], state_dir: Path, tmp_path: Path
) -> None:
    mp, _, manifest = checkpointed
    files = {f["path"]: f for f in manifest["files"]}  # type: ignore[attr-defined]
    assert files[f"{mp}/config"]["sha256"] and files[f"{mp}/data.bin"]["sha256"]
    assert files[f"{mp}/scratch"]["state"] == "deleted" and files[f"{mp}/scratch"]["ghost"]["sha256"]
    assert "digests" in manifest["timings"]  # type: ignore[operator]

    copy = tmp_path / "copy"
    assert _snapcore(state_dir, "restore", "c1", "--to", str(copy)).returncode == 0
    ok = _snapcore(state_dir, "check-files", "c1", "--root", str(copy))
    assert ok.returncode == 0 and "as they had them" in ok.stdout, ok.stdout + ok.stderr

    # the same size and mtime, other bytes: only the digest sees it
    config = copy / "config"  # one mount: its tree is the copy itself
    st = config.stat()
    config.write_text("setting = 2\n")
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    (copy / "data.bin").unlink()
    bad = _snapcore(state_dir, "check-files", "c1", "--root", str(copy), "--json")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    found = json.loads(bad.stdout)
    assert not found["ok"] and len(found["problems"]) == 2, found
    assert any("config: other content than the checkpoint's" in p for p in found["problems"])
    assert any("data.bin: missing" in p for p in found["problems"])

    # the live tree, one mount's files: as the program had them, until one is altered
    live = _snapcore(state_dir, "check-files", "c1", "--mount", str(mp))
    assert live.returncode == 0, live.stdout + live.stderr
    st = (mp / "config").stat()
    (mp / "config").write_text("setting = 3\n")
    os.utime(mp / "config", ns=(st.st_atime_ns, st.st_mtime_ns))
    live = _snapcore(state_dir, "check-files", "c1", "--mount", str(mp), "--json")
    assert live.returncode == 1 and "Traceback" not in live.stderr, live.stderr
    assert json.loads(live.stdout)["problems"] == [f"{mp}/config: other content than the checkpoint's (sha256 differs)"]


def test_restore_refuses_to_start_the_program_on_files_that_differ(
    checkpointed: tuple[Path, Path, dict[str, object]], state_dir: Path, tmp_path: Path
) -> None:
    """``restore --to DIR -- CMD`` restores, checks, and runs CMD only if the files are
    the checkpoint's: an export altered behind snapcore's back (same size and mtime)
    stops it, naming the file; ``--no-check`` runs it anyway."""
    _, _, manifest = checkpointed
    export = Path(manifest["targets"][0]["export_record"]["ref"])  # type: ignore[index]
    config = export / "config"
    st = config.stat()
    config.write_text("setting = 9\n")
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))
    ran = tmp_path / "ran"
    refused = _snapcore(state_dir, "restore", "c1", "--to", str(tmp_path / "r1"), "--", "touch", str(ran))
    assert refused.returncode == 1 and not ran.exists(), refused.stderr
    assert "config: other content than the checkpoint's" in refused.stderr
    assert "not running touch" in refused.stderr and "Traceback" not in refused.stderr
    anyway = _snapcore(state_dir, "restore", "c1", "--to", str(tmp_path / "r2"), "--no-check", "--", "touch", str(ran))
    assert anyway.returncode == 0 and ran.exists(), anyway.stderr


def test_a_file_written_until_the_freeze_is_recorded_as_it_was_then(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program appending to its log until it is frozen: the size and mtime recorded
    are those at the freeze (what the image holds), so the restored copy checks; the
    digest taken before the freeze is dropped with a note."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    fs = loop_fs("ext4", size_mb=64)
    log = fs.mount_point / "app.log"
    writer = subprocess.Popen(
        ["sh", "-c", f'exec 3>>"{log}"; while :; do echo tick >&3; sleep 0.002; done'],
    )
    try:
        deadline = time.monotonic() + 30
        while not log.exists() or log.stat().st_size < 50:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        exports = tmp_path / "exports"
        exports.mkdir()
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            f"version: 1\nmounts:\n  {fs.mount_point}:\n    imager: fsfreeze\n    exporter: rsync\n"
            f"    options:\n      rsync:\n        dest: {exports}\n"
        )
        done = _snapcore(state_dir, "checkpoint", "--policy", str(policy), "--pid", str(writer.pid), "--json")
        assert done.returncode == 0, done.stderr
    finally:
        writer.kill()
        writer.wait()
    manifest = json.loads(done.stdout)
    [entry] = [f for f in manifest["files"] if f["path"] == str(log)]
    assert entry["sha256"] is None and "written to until the tasks stopped" in entry["digest_note"], entry
    copy = tmp_path / "copy"
    assert _snapcore(state_dir, "restore", manifest["id"], "--to", str(copy)).returncode == 0
    ok = _snapcore(state_dir, "check-files", manifest["id"], "--root", str(copy))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_paths_from_a_manifest_stay_in_the_tree(tmp_path: Path) -> None:
    """The manifest is untrusted: relative paths, '..' and symlinks out of the tree are
    problems, never followed; records that are not objects are problems too."""
    root = tmp_path / "root"
    (root / "srv").mkdir(parents=True)
    (root / "srv" / "out").symlink_to("/etc")
    entry = {"kind": "file", "state": "present", "size": 1, "mtime_ns": 1, "mount": "/srv"}
    problems = check_files(
        [
            {**entry, "path": "etc/passwd"},
            {**entry, "path": "/srv/../../etc/passwd"},
            {**entry, "path": "/srv/out/passwd"},  # through the symlink srv/out -> /etc
            {**entry, "path": "/srv/none", "host_path": "/srv/nothing"},
            "not an object",  # type: ignore[list-item]
            {**entry, "path": "/srv/x", "state": "strange"},
            {**entry, "path": "/etc/passwd"},  # not on its mount
            {**entry, "path": "/srv/y", "mount": "/elsewhere"},  # a mount not restored: not checked
        ],
        {"/srv": root / "srv"},
    )
    assert len(problems) == 7, problems
    assert "not an absolute path" in problems[0] and "holds '..'" in problems[1]
    assert "leads out of" in problems[2] and problems[3].endswith("srv/nothing: missing")
    assert "not an object" in problems[4] and "unknown state" in problems[5]
    assert "not on its mount /srv" in problems[6]


def test_a_ghost_copy_named_by_a_manifest_is_read_only_if_it_is_a_regular_file(tmp_path: Path) -> None:
    """A ghost path from a (tampered) manifest naming a device or a symlink is a
    problem, never read: /dev/zero would never end."""
    real = tmp_path / "ghost"
    real.write_bytes(b"old content\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    sha = hashlib.sha256(b"old content\n").hexdigest()
    entry = {"kind": "file", "state": "deleted", "path": "/srv/f", "mount": "/srv"}
    problems = check_files(
        [
            {**entry, "ghost": {"path": "/dev/zero", "size": 12, "sha256": sha}},
            {**entry, "ghost": {"path": str(link), "size": 12, "sha256": sha}},
            {**entry, "ghost": {"path": str(real), "size": 12, "sha256": sha}},
            {**entry, "ghost": {"path": str(real), "size": 5, "sha256": sha}},  # longer than recorded
        ]
    )
    assert len(problems) == 3, problems
    assert "not a regular file" in problems[0] and str(link) in problems[1]
    assert "is not the content copied" in problems[2]
