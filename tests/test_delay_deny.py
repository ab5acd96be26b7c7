"""``on_change: delay | deny`` through ``snapcore checkpoint --pid`` as users start it:
write opens of the tasks' files held until the thaw or refused, what fanotify cannot
hold still failing the checkpoint, and a dead or stalled controller never leaving an
opener blocked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapcore.cli import main
from snapcore.testing import LoopFactory, LoopFS, Pace, assert_not_frozen, wait_for_path
from snapcore.testing.processes import Holders, Stranger, start_stranger

pytestmark = pytest.mark.usefixtures("root_only")

SNAPCORE = [sys.executable, "-m", "snapcore"]


@dataclass
class Scene:
    fs: LoopFS
    data: Path
    pid: int
    state_dir: Path
    tmp: Path
    pace: Pace

    def policy(self, on_change: str, freeze_timeout: float = 10.0) -> Path:
        path = self.tmp / f"policy-{on_change}.yaml"
        path.write_text(
            f"version: 1\nmounts:\n  {self.fs.mount_point}:\n    imager: btrfs\n"
            f"    on_change: {on_change}\n    freeze_timeout: {freeze_timeout:g}\n"
        )
        return path

    def start(self, cid: str, on_change: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[bytes]:
        """``snapcore checkpoint`` whose payload waits (the tasks frozen) for :meth:`go`."""
        inwin, go = self.tmp / f"{cid}.in", self.tmp / f"{cid}.go"
        payload = f"touch {inwin}; while [ ! -e {go} ]; do sleep 0.01; done"
        policy = self.policy(on_change, **kw)
        argv = [*SNAPCORE, "--state-dir", str(self.state_dir), "checkpoint", "--policy", str(policy)]
        proc = subprocess.Popen(
            [*argv, "--pid", str(self.pid), "--id", cid, "--", "sh", "-c", payload],
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if env is None or "SNAPCORE_FAULT" not in env:
            try:
                wait_for_path(inwin, proc, self.pace.seconds(30), "the checkpoint's payload")
            except BaseException:
                proc.kill()
                _, err = proc.communicate()
                print(err.decode(errors="replace"))
                raise
        return proc

    def finish(self, cid: str, proc: subprocess.Popen[bytes]) -> tuple[int, dict[str, Any]]:
        (self.tmp / f"{cid}.go").touch()
        _, err = proc.communicate(timeout=self.pace.seconds(60))
        manifest = json.loads((self.state_dir / "checkpoints" / cid / "manifest.json").read_text())
        assert manifest["outcome"] in ("ok", "failed"), err
        return proc.returncode, manifest

    def opener(self, how: str, name: str = "o") -> Stranger:
        return start_stranger(self.data, how, self.tmp / f"opener-{name}")


@pytest.fixture
def scene(
    loop_fs: LoopFactory,
    holder: Holders,
    state_dir: Path,
    tmp_path: Path,
    pace: Pace,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Scene]:
    monkeypatch.setenv("SNAPCORE_PLUGINS", "btrfs,fsfreeze")  # an image to compare with
    fs = loop_fs("btrfs")
    data = fs.mount_point / "data.db"
    data.write_bytes(b"as checkpointed\n")
    pid = holder(f"r:{data}")
    yield Scene(fs=fs, data=data, pid=pid, state_dir=state_dir, tmp=tmp_path, pace=pace)
    assert_not_frozen(fs.mount_point)


def _snapshot_data(scene: Scene, cid: str) -> bytes:
    return (scene.fs.mount_point / ".snapshots" / cid / scene.data.name).read_bytes()


def test_delay_holds_a_writer_until_the_tasks_thaw(scene: Scene) -> None:
    proc = scene.start("d", "delay")
    writer = scene.opener("append")
    writer.wait_blocked(10)
    reader = scene.opener("read", "r")
    assert reader.result(10)["result"] == "ok"  # reads are answered at once
    assert scene.data.read_bytes() == b"as checkpointed\n"
    code, manifest = scene.finish("d", proc)
    assert writer.result(10)["result"] == "ok"
    assert code == 0 and manifest["outcome"] == "ok" and manifest["changes"] == []
    (held,) = manifest["holds"]
    assert held["action"] == "delayed" and held["released"] == "thaw" and held["pid"] == writer.pid
    assert held["path"] == str(scene.data) and held["flags"] == "O_WRONLY|O_APPEND (openat)" and held["held_ms"] > 0
    assert _snapshot_data(scene, "d") == b"as checkpointed\n"  # the image is the checkpoint's
    assert scene.data.read_bytes() == b"as checkpointed\nstranger\n"  # the write landed after the thaw
    shown = subprocess.run(
        [*SNAPCORE, "--state-dir", str(scene.state_dir), "show", "d"], capture_output=True, text=True, check=True
    ).stdout
    assert f"(pid {writer.pid}) opening {scene.data} O_WRONLY|O_APPEND (openat)" in shown
    assert "  delayed: python" in shown


def test_deny_refuses_a_writer(scene: Scene) -> None:
    proc = scene.start("n", "deny")
    assert scene.opener("rdwr").result(10)["result"] == "EPERM"
    code, manifest = scene.finish("n", proc)
    assert code == 0 and [h["action"] for h in manifest["holds"]] == ["denied"]
    assert scene.data.read_bytes() == b"as checkpointed\n"
    assert scene.opener("rdwr", "after").result(10)["result"] == "ok"  # only while the tasks were frozen


@pytest.mark.parametrize("change", ["unlink", "rename", "rename-over", "truncate", "write-through-an-older-descriptor"])
def test_what_fanotify_cannot_hold_still_fails_the_checkpoint(scene: Scene, change: str) -> None:
    """``delay`` is never weaker than ``fail``: changes that open nothing (or opened
    before the hold) are caught by the watch."""
    early = os.open(scene.data, os.O_WRONLY | os.O_APPEND)  # opened while the tasks ran
    try:
        proc = scene.start("w", "delay")
        if change == "unlink":
            scene.data.unlink()
        elif change == "rename":
            scene.data.rename(scene.data.with_suffix(".old"))
        elif change == "rename-over":
            other = scene.data.with_suffix(".new")
            other.write_bytes(b"another file\n")
            other.rename(scene.data)
        elif change == "truncate":
            os.truncate(scene.data, 3)
        else:
            os.write(early, b"late\n")
        code, manifest = scene.finish("w", proc)
    finally:
        os.close(early)
    assert code == 1 and manifest["outcome"] == "failed", manifest
    assert "changed" in manifest["error"] and manifest["holds"] == []
    assert manifest["changes"], manifest


def test_the_payloads_own_write_is_not_held_but_judged(scene: Scene) -> None:
    """The payload (``criu dump``) is part of the checkpoint: held, it would stall it."""
    policy = scene.policy("delay")
    argv = [*SNAPCORE, "--state-dir", str(scene.state_dir), "checkpoint", "--policy", str(policy)]
    result = subprocess.run(
        [*argv, "--pid", str(scene.pid), "--id", "p", "--", "sh", "-c", f"echo payload >> {scene.data}"],
        capture_output=True,
        timeout=scene.pace.seconds(60),
    )
    manifest = json.loads((scene.state_dir / "checkpoints" / "p" / "manifest.json").read_text())
    assert result.returncode == 1 and manifest["holds"] == []
    assert {c["kind"] for c in manifest["changes"]} == {"modify"}


def _wait_reached(path: Path, proc: subprocess.Popen[bytes], pace: Pace) -> None:
    deadline = time.monotonic() + pace.seconds(30)
    while "snapshot=hang" not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "the controller never reached its snapshot"
        time.sleep(0.01)


def _assert_tasks_run(pid: int, pace: Pace) -> None:
    from snapcore.tasks.cgroups import cgroup_hierarchies, task_cgroup

    v2, _ = cgroup_hierarchies()
    assert v2 is not None
    events = Path(v2.dir_of(task_cgroup(pid, 2) or "/") or "/", "cgroup.events")
    deadline = time.monotonic() + pace.seconds(10)
    while "frozen 0" not in events.read_text():
        assert time.monotonic() < deadline, "the tasks stayed frozen"
        time.sleep(0.02)


def _answerer_of(controller: int) -> int:
    """The open hold's answering process: the controller's child running its program."""
    cmdline = Path(f"/proc/{controller}/cmdline").read_bytes()
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    (pid,) = [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline]
    return pid


@pytest.mark.parametrize("stall", ["sigkill", "sigstop", "answerer-sigstop"])
def test_a_dead_or_stalled_controller_never_leaves_an_opener_held(scene: Scene, stall: str) -> None:
    """Inside the window (the controller parked in its snapshot), a writer is held;
    then the controller is SIGKILLed (the answering process sees it gone and lets
    the writer go) or SIGSTOPped (reads are still answered; the writer goes at the
    hold's end), or the answering process is SIGSTOPped (the guard answers the
    events it holds, by their descriptor numbers, at the hold's end). Each way the
    writer proceeds in time."""
    reached = scene.tmp / "reached"
    deadline_s = scene.pace.seconds(2.0)
    env = {"SNAPCORE_FAULT": "snapshot=hang", "SNAPCORE_FAULT_REACHED": str(reached)}
    proc = scene.start("k", "delay", env=env, freeze_timeout=deadline_s)
    try:
        _wait_reached(reached, proc, scene.pace)
        writer = scene.opener("append")
        writer.wait_blocked(10)
        victim = _answerer_of(proc.pid) if stall == "answerer-sigstop" else proc.pid
        os.kill(victim, signal.SIGKILL if stall == "sigkill" else signal.SIGSTOP)
        stalled = time.monotonic()
        if stall == "sigstop":  # the answering process is not the controller: reads go on
            assert scene.opener("read", "r").result(deadline_s / 2)["result"] == "ok"
        assert writer.result(deadline_s + scene.pace.seconds(10))["result"] == "ok"
        elapsed = time.monotonic() - stalled
        if stall == "sigkill":  # the answerer saw the death at once (5-8 ms here), not at the hold's end
            assert elapsed < deadline_s / 2, elapsed
        else:  # not before the hold's end (the answering process's, or for it the guard's)
            assert elapsed >= deadline_s - 0.5, elapsed
            if stall == "answerer-sigstop":
                os.kill(victim, signal.SIGKILL)
            # the tasks' own freeze has no deadline past the filesystems' window (and
            # btrfs snapshots freeze nothing): they wait for the controller to go on or die
            proc.kill()
        _assert_tasks_run(scene.pid, scene.pace)
        assert_not_frozen(scene.fs.mount_point)
    finally:
        proc.kill()
        os.kill(proc.pid, signal.SIGCONT) if proc.poll() is None else None
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert main(["--state-dir", str(scene.state_dir), "recover"]) == 0
    manifest = json.loads((scene.state_dir / "checkpoints" / "k" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed"
    assert b"stranger" in scene.data.read_bytes()
