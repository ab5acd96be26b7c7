"""podman container checkpoint and restore with snapcore, driven the way podman's users
drive it: ``podman run --annotation org.criu.config=FILE`` names the CRIU config file
that carries snapcore's action script, then ``podman container checkpoint`` and
``podman container restore`` (with ``--export``/``--import`` too). podman runs in a
storage root of the test's own (``--root``/``--runroot``), with the lower ulimits this
machine needs (``CONTAINERS_CONF``, see shared/notes/containers.md); the image is a
busybox rootfs imported from a tar, nothing is pulled.

The container's rootfs is podman's overlay (the host has it mounted at podman's
merged directory, not covered by the test's policy: named in a warning), its data a
volume on a btrfs subvolume mounted on its own: imaged at post-dump while CRIU holds
the container, rolled back in place at pre-restore (podman's runtime binds only the
rootfs before CRIU runs). The counter in the volume goes on from the checkpoint's
value; the file the container holds open after deleting it is intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapcore import main
from snapcore.testing import LoopFactory, Pace
from snapcore.testing.containers import COUNTER_PROGRAM, HELD_WHILE_DELETED, busybox_rootfs, read_count, wait_for_count

CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""


@dataclass
class Podman:
    argv: list[str]
    env: dict[str, str]
    volume: Path
    state_dir: Path
    tmp: Path

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.argv, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and done.returncode != 0:
            # CRIU's log, named in the error, goes with the container at teardown: quote it now
            logs = re.findall(r"log file: (\S+)", done.stderr)
            tail = Path(logs[-1]).read_text(errors="replace")[-4000:] if logs and Path(logs[-1]).exists() else ""
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}: {done.stderr[-2000:]}\n{tail}")
        return done

    def count(self) -> int:
        value = read_count(self.volume / "count")
        assert value is not None, f"no counter in {self.volume}"
        return value

    def wait_count(self, above: int, timeout: float) -> int:
        return wait_for_count(self.volume / "count", above, timeout)

    def log(self, name: str, which: str) -> str:
        static = self("inspect", "-f", "{{.StaticDir}}", name).stdout.strip()
        path = Path(static) / which
        return path.read_text(errors="replace") if path.exists() else f"({path} missing)"

    def pid(self, name: str) -> int:
        return int(self("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())


@pytest.fixture
def podman(
    loop_fs: LoopFactory,
    tmp_path: Path,
    state_dir: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    pace: Pace,
    criu: Any,
) -> Iterator[Podman]:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.skip("podman is missing: apt-get install --no-install-recommends podman runc (make setup does)")
    monkeypatch.setenv("SNAPCORE_PLUGINS", "btrfs,fsfreeze")
    volume = loop_fs("btrfs").mount_subvolume("data", tmp_path / "data")
    (tmp_path / "containers.conf").write_text(CONTAINERS_CONF)
    # runc runs the CRIU on its PATH: the working one first (Debian's 3.17 fails here)
    path = f"{Path(criu.path).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env = dict(os.environ, CONTAINERS_CONF=str(tmp_path / "containers.conf"), PATH=path)
    runroot = Path(tempfile.mkdtemp(prefix="snapcore-pm-"))  # podman wants it under 50 characters
    argv = ["podman", "--root", str(tmp_path / "storage"), "--runroot", str(runroot)]
    argv += ["--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    pod = Podman(argv=argv, env=env, volume=volume, state_dir=state_dir, tmp=tmp_path)
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    with tarfile.open(tmp_path / "rootfs.tar", "w") as tar:
        tar.add(rootfs, arcname=".")
    pod("import", str(tmp_path / "rootfs.tar"), "snapcore-busybox")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nmounts:\n  {volume}:\n    imager: btrfs\n")
    hook = tmp_path / "snapcore-hook"
    args = ["--state-dir", str(state_dir), "--run-dir", str(run_dir), "criu-hook", "--policy", str(policy)]
    assert main([*args, "--write-script", str(hook)]) == 0
    (tmp_path / "criu.conf").write_text(f"action-script {hook}\n")
    try:
        yield pod
    finally:
        pod("rm", "-a", "-f", check=False)
        pod("rmi", "-a", "-f", check=False)
        subprocess.run(["umount", "-R", str(tmp_path / "storage" / "overlay")], capture_output=True)
        shutil.rmtree(runroot, ignore_errors=True)


def run_web(pod: Podman, pace: Pace) -> None:
    pod(
        "run", "-d", "--name", "web", "--network", "none",
        "--annotation", f"org.criu.config={pod.tmp / 'criu.conf'}",
        "-v", f"{pod.volume}:/data", "snapcore-busybox", "sh", "-c", COUNTER_PROGRAM,
    )  # fmt: skip
    pod.wait_count(2, pace.seconds(30))


def _manifest(pod: Podman) -> Any:
    [checkpoint_id] = [p.name for p in (pod.state_dir / "checkpoints").iterdir()]
    return json.loads((pod.state_dir / "checkpoints" / checkpoint_id / "manifest.json").read_text())


def test_podman_checkpoint_and_restore_roll_the_volume_back(podman: Podman, pace: Pace) -> None:
    pod = podman
    run_web(pod, pace)
    pod("container", "checkpoint", "--keep", "web")
    assert pod.log("web", "dump.log").count("of the dumped tasks' filesystems") == 1
    at_checkpoint = pod.count()
    manifest = _manifest(pod)
    assert manifest["outcome"] == "ok", manifest.get("error")
    [target] = manifest["targets"]
    assert target["mount"] == str(pod.volume) and target["consistency"] == "tasks-frozen"
    files = {f["path"]: f for f in manifest["files"]}
    assert files["/data/deleted"]["state"] == "deleted" and files["/data/deleted"]["ghost"]["sha256"]
    assert files["/data/deleted"]["host_path"] == f"{pod.volume}/deleted"
    # the rootfs is podman's overlay, mounted on the host at its merged directory
    rootfs = files["/bin/busybox"]["mount"]
    assert rootfs.endswith("/merged") and files["/bin/busybox"]["fstype"] == "overlay"
    assert any(rootfs in w and "not covered by the policy" in w for w in manifest["warnings"])

    (pod.volume / "count").write_text("garbage\n")
    (pod.volume / "stray").write_text("not in the checkpoint\n")
    pod("container", "restore", "--keep", "web")
    assert "rolled back in place" in pod.log("web", "restore.log")
    assert not (pod.volume / "stray").exists()
    after = pod.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)
    assert Path(f"/proc/{pod.pid('web')}/fd/3").read_text() == HELD_WHILE_DELETED


def test_podman_export_and_import(podman: Podman, pace: Pace) -> None:
    """``checkpoint --export``, ``rm``, ``restore --import``: the checkpoint id travels in
    the exported CRIU images, and the hook finds it there."""
    pod = podman
    run_web(pod, pace)
    exported = pod.tmp / "web.tar.zst"
    pod("container", "checkpoint", "--export", str(exported), "web")
    at_checkpoint = pod.count()
    assert _manifest(pod)["outcome"] == "ok"
    pod("rm", "-f", "web")
    (pod.volume / "count").write_text("garbage\n")
    pod("container", "restore", "--import", str(exported))
    after = pod.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)


def test_podman_checkpoint_through_snapcore_container(podman: Podman, run_dir: Path, pace: Pace) -> None:
    """``snapcore checkpoint --container podman:web -- podman ... container checkpoint
    ... web``: podman runs runc, runc runs CRIU, and CRIU's post-dump reaches the
    running snapcore through the relay; one checkpoint, the container's own hook
    leaving the dump to it; podman's restore (the hook at pre-restore) rolls back."""
    pod = podman
    run_web(pod, pace)
    policy = pod.tmp / "policy.yaml"
    argv = [sys.executable, "-m", "snapcore", "--state-dir", str(pod.state_dir), "--run-dir", str(run_dir)]
    argv += ["checkpoint", "--policy", str(policy), "--container", "podman:web", "--"]
    argv += [*pod.argv, "container", "checkpoint", "--keep", "web"]
    done = subprocess.run(argv, env=pod.env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    dump_log = pod.log("web", "dump.log")
    assert done.returncode == 0, done.stderr + dump_log[-3000:]
    assert dump_log.count("of the dumped tasks' filesystems") == 1, dump_log[-3000:]
    assert "handled by 'snapcore checkpoint --container'" in dump_log
    at_checkpoint = pod.count()
    manifest = _manifest(pod)
    assert manifest["outcome"] == "ok", manifest.get("error")
    assert manifest["id"] in done.stdout and manifest["tasks"]["container"] == "podman:web"
    [target] = manifest["targets"]
    assert target["mount"] == str(pod.volume) and target["consistency"] == "tasks-frozen"

    (pod.volume / "count").write_text("garbage\n")
    pod("container", "restore", "--keep", "web")
    assert "rolled back in place" in pod.log("web", "restore.log")
    after = pod.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)

    # a CRIU named by path (podman --runtime-flag criu=PATH) with podman's bare
    # environment never reaches the relay: the container's own hook does the work
    criu = pod.env["PATH"].split(":")[0] + "/criu"
    argv = [*argv[: argv.index("--") + 1], *pod.argv, "--runtime-flag", f"criu={criu}"]
    argv += ["container", "checkpoint", "--keep", "web"]
    done = subprocess.run(argv, env=pod.env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr + pod.log("web", "dump.log")[-3000:]
    assert "did not reach this snapcore" in done.stderr and "the container's own hook made" in done.stderr
    made = [p.name for p in (pod.state_dir / "checkpoints").iterdir() if not p.name.startswith("before-restore-")]
    assert len(made) == 2 and manifest["id"] in made, made
