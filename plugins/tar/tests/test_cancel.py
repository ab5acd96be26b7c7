"""SIGTERM, Ctrl-C and ``kill -9`` while ``snapcore checkpoint`` runs GNU tar.

The real command, started as an admin or a job manager starts it, signalled while
tar is writing: in the freeze window (fsfreeze: tar copies the frozen tree) and
after it (btrfs: tar copies the snapshot). A cancellation is a failure: thawed,
tar's process group gone, no ``.part`` left, a failed manifest, exit status 1. A
killed controller takes tar with it, and ``snapcore recover`` removes the rest.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tar_helpers import MiB, exporter_policy

from snapcore.testing import LoopFactory, LoopFS, assert_not_frozen, machine_pace
from snapcore_tar.common import slug

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems need root")

#: Random data, gzip-compressed: seconds of tar on any machine of this kind (gzip
#: runs at 30-60 MB/s on incompressible data), while the test signals within
#: milliseconds of tar's first write.
DATA_MIB = 96


def _source(loop_fs: LoopFactory, fstype: str) -> LoopFS:
    src = loop_fs(fstype, size_mb=DATA_MIB + 96)
    with open(src.mount_point / "random.bin", "wb") as f:
        for _ in range(DATA_MIB):
            f.write(os.urandom(MiB))
    (src.mount_point / "small.txt").write_text("small\n")
    return src


def _tar_group(part: Path) -> int | None:
    """The process group of the tar writing ``part``, if it runs."""
    needle = f"--file={part}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if needle in argv and os.path.basename(argv[0]) == b"tar":
                return os.getpgid(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return None


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs. Zombies do not count: they
    are dead, waiting for PID 1 to reap them (this machine's PID 1 does so late)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _checkpoint_argv(state_dir: Path, policy: Path, cid: str) -> list[str]:
    snapcore = [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir)]
    return [*snapcore, "checkpoint", "--policy", str(policy), "--id", cid]


def _start(policy: Path, state_dir: Path, export_dir: Path, cid: str) -> tuple[subprocess.Popen[str], Path, int]:
    """``snapcore checkpoint`` in a session of its own (as a service manager starts
    it), once tar is writing: the command, the ``.part`` and tar's process group."""
    proc = subprocess.Popen(
        _checkpoint_argv(state_dir, policy, cid),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + machine_pace().seconds(30)
    while True:
        parts = sorted(export_dir.glob(".*.part")) if export_dir.is_dir() else []
        group = _tar_group(parts[0]) if parts else None
        if group is not None:
            return proc, parts[0], group
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the checkpoint ended ({proc.returncode}) before tar was seen writing: {out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("tar was not seen writing within the time allowed")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def tar_seconds(tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long tar would go on writing if nobody stopped it: gzip's time for
    DATA_MIB of random data, measured here on 16 MiB."""
    sample = tmp_path_factory.mktemp("gzip") / "sample"
    sample.write_bytes(os.urandom(16 * MiB))
    t = time.monotonic()
    with open(sample, "rb") as f:
        subprocess.run(["gzip", "-c"], stdin=f, stdout=subprocess.DEVNULL, check=True)
    return (time.monotonic() - t) * DATA_MIB / 16


def _wait_gone(pgid: int, within: float) -> None:
    """Wait for a killed process group to be reaped (its orphans by PID 1): in well
    under the time tar would have taken to finish by itself."""
    deadline = time.monotonic() + within
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            pytest.fail(f"tar's process group {pgid} outlived its controller by {within:.1f}s")
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("imager", "fstype", "signum"),
    [
        ("fsfreeze", "ext4", signal.SIGTERM),  # tar inside the freeze window
        ("fsfreeze", "ext4", signal.SIGINT),
        ("btrfs", "btrfs", signal.SIGTERM),  # tar on the snapshot, after the thaw
    ],
    ids=["window-sigterm", "window-sigint", "after-thaw-sigterm"],
)
def test_a_signal_during_the_export_cancels_the_checkpoint(
    loop_fs: LoopFactory,
    state_dir: Path,
    tmp_path: Path,
    imager: str,
    fstype: str,
    signum: int,
    tar_seconds: float,
) -> None:
    src = _source(loop_fs, fstype)
    out = loop_fs("ext4", size_mb=DATA_MIB + 96)
    dest = out.mount_point / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest), "compress": "gzip"}, imager=imager)

    proc, part, group = _start(policy, state_dir, dest / "c1", "c1")
    t = time.monotonic()
    os.kill(proc.pid, signum)
    _, stderr = proc.communicate(timeout=machine_pace().seconds(30) + tar_seconds)
    _wait_gone(group, tar_seconds / 2 - (time.monotonic() - t))
    # not after tar was done: the command ended with it, in a fraction of tar's time
    assert time.monotonic() - t < tar_seconds / 2

    assert proc.returncode == 1, stderr
    name = signal.Signals(signum).name
    assert f"snapcore: error: cancelled ({name} received)" in stderr
    assert "Traceback" not in stderr
    assert not part.exists() and not (dest / "c1").exists(), sorted(p.name for p in dest.rglob("*"))
    manifest = json.loads((state_dir / "checkpoints" / "c1" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed"
    assert manifest["error"] == f"cancelled ({name} received)"
    assert manifest["targets"][0]["image"] is None and manifest["targets"][0]["export"] is None
    if imager == "btrfs":  # the snapshot tar was reading is gone too
        listing = subprocess.run(
            ["btrfs", "subvolume", "list", str(src.mount_point)], capture_output=True, text=True, check=True
        )
        assert listing.stdout.strip() == ""
    assert_not_frozen(src.mount_point)
    assert not list((Path(os.environ["SNAPCORE_RUN_DIR"]) / "journal").glob("*.jsonl"))


def test_a_killed_controller_takes_tar_with_it_and_recover_removes_the_part(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, tar_seconds: float
) -> None:
    src = _source(loop_fs, "ext4")
    out = loop_fs("ext4", size_mb=DATA_MIB + 96)
    dest = out.mount_point / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "tar", {"dest": str(dest), "compress": "gzip"})

    proc, part, group = _start(policy, state_dir, dest / "k1", "k1")
    t = time.monotonic()
    proc.kill()
    proc.communicate()
    _wait_gone(group, tar_seconds / 2 - (time.monotonic() - t))  # the parent-death signal, not tar's end
    assert part.exists(), "the half-written archive is still there for recover to find"
    assert_not_frozen(src.mount_point)  # the guard thawed the window's freeze

    done = subprocess.run(
        [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "recover"],
        capture_output=True,
        text=True,
        timeout=machine_pace().seconds(30),
    )

    assert done.returncode == 0, done.stderr
    assert "checkpoint k1: marked failed" in done.stdout
    assert f"removed the unfinished export file {part}" in done.stdout
    assert not part.exists() and not (dest / "k1").exists()
    manifest = json.loads((state_dir / "checkpoints" / "k1" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed"


def _killed_checkpoint(policy: Path, state_dir: Path, cid: str, fault: str) -> None:
    """``snapcore checkpoint`` killed (SIGKILL, by SNAPCORE_FAULT) at ``fault``."""
    done = subprocess.run(
        _checkpoint_argv(state_dir, policy, cid),
        env=dict(os.environ, SNAPCORE_FAULT=fault),
        capture_output=True,
        text=True,
        timeout=machine_pace().seconds(60),
    )
    assert done.returncode == -signal.SIGKILL, done.stderr


def _recover(state_dir: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "recover"],
        capture_output=True,
        text=True,
        timeout=machine_pace().seconds(30),
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return done.stdout


@pytest.mark.parametrize("exporter", ["tar", "rsync"])
def test_recover_discards_a_finished_export_of_a_controller_killed_before_its_manifest(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, exporter: str
) -> None:
    src = loop_fs("ext4", size_mb=64)
    src.write("a/file.txt", "data\n")
    dest = tmp_path / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, exporter, {"dest": str(dest)})
    _killed_checkpoint(policy, state_dir, "f1", "finish=kill")  # every export done, no manifest yet
    assert (dest / "f1").is_dir()

    report = _recover(state_dir)

    assert "checkpoint f1: marked failed" in report
    assert "discarded the export" in report
    assert not (dest / "f1").exists(), sorted(p.name for p in dest.rglob("*"))
    manifest = json.loads((state_dir / "checkpoints" / "f1" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed"


def test_recover_removes_a_planted_rsync_part_tree_of_a_controller_killed_at_export(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path
) -> None:
    """A fake for what cannot be timed for real: a local rsync copies too fast to be
    killed halfway on demand. The controller really dies where the export starts;
    the test then leaves the ``.part`` tree that rsync would have been writing."""
    src = loop_fs("ext4", size_mb=64)
    src.write("a/file.txt", "data\n")
    dest = tmp_path / "exports"
    dest.mkdir()
    policy = exporter_policy(tmp_path, src.mount_point, "rsync", {"dest": str(dest)})
    _killed_checkpoint(policy, state_dir, "p1", "export=kill")
    part = dest / "p1" / f".{slug(str(src.mount_point))}.part"
    (part / "a").mkdir(parents=True)
    (part / "a" / "file.txt").write_text("da")
    outside = dest / "other-checkpoint" / f".{slug(str(src.mount_point))}.part"
    outside.mkdir(parents=True)

    report = _recover(state_dir)

    assert f"removed the unfinished export file {part}" in report
    assert not (dest / "p1").exists()
    assert outside.is_dir(), "another checkpoint's files are not this checkpoint's to remove"
