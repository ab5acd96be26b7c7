"""The safety net: the guard process, the journal and recover, mount locks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import snapcore
from snapcore.cli import main
from snapcore.errors import LockBusy
from snapcore.host.locks import MountLock
from snapcore.safety.journal import Journal, read_journal, recover
from snapcore.testing import LoopFactory, Pace, assert_not_frozen, machine_pace, start_write, thaw_quietly

pytestmark = pytest.mark.usefixtures("root_only")

CONTROLLER = """
import os, sys, time, snapcore
from pathlib import Path
from snapcore.safety.deadline import GuardLink
policy, state, ready, how = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
if how == "spawn":
    GuardLink.FORK_MAX_RSS = 0  # as in a big process: a fresh interpreter
with snapcore.hold(policy=policy, state_dir=state, checkpoint_id="victim"):
    if how == "child" and os.fork() == 0:  # a child that outlives us must not keep the guard waiting
        ready.with_name("child.pid").write_text(str(os.getpid()))
        time.sleep(30)
        os._exit(0)
    ready.write_text("frozen")
    time.sleep(120)
"""


def _policy(tmp_path: Path, mounts: list[LoopFactory | object], timeout: str = "60s") -> Path:
    body = "".join(f"  {m}:\n    imager: fsfreeze\n" for m in mounts)
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: 1\ndefaults:\n  freeze_timeout: {timeout}\nmounts:\n{body}")
    return path


def _start_controller(
    tmp_path: Path, policy: Path, state: Path, how: str = "fork"
) -> tuple[subprocess.Popen[bytes], Path]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(policy), str(state), str(ready), how],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + machine_pace().seconds(30)
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"controller never froze: {proc.stderr.read() if proc.stderr else b''!r}")
        time.sleep(0.01)
    return proc, ready


@pytest.mark.parametrize("how", ["fork", "spawn", "child"])
def test_sigkill_of_the_controller_is_thawed_by_the_guard(
    loop_fs: LoopFactory, tmp_path: Path, state_dir: Path, how: str, pace: Pace
) -> None:
    """The guard forked, or started as an interpreter, or with a forked child of the
    controller still alive (it must not hold the guard's socket open)."""
    a, b = loop_fs("ext4"), loop_fs("xfs")
    policy = _policy(tmp_path, [a, b])
    proc, _ = _start_controller(tmp_path, policy, state_dir, how)
    try:
        probes = [start_write(fs.mount_point / "after-kill") for fs in (a, b)]
        assert not probes[0].done(pace.seconds(0.2)), "the controller should be holding the freeze"
        killed = time.monotonic()
        proc.kill()
        for probe in probes:
            assert probe.done(pace.seconds(5)), "the guard did not thaw after the controller died"
        elapsed = time.monotonic() - killed
        assert elapsed < pace.seconds(2.0)  # measured precisely by bench/safety.py (target: 100 ms)
    finally:
        proc.kill()
        # the child holds the mounts busy (its inherited descriptors): the
        # teardown's umount would retry for ~20 s, then detach them lazily
        child = tmp_path / "child.pid"
        if child.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(child.read_text()), signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        for fs in (a, b):
            thaw_quietly(fs.mount_point)
    run_dir = Path(os.environ["SNAPCORE_RUN_DIR"])
    pending, alive = read_journal(run_dir / "journal" / "victim.jsonl")
    assert not alive
    assert set(pending.frozen) == {str(a), str(b)}  # frozen, never recorded as thawed
    assert pending.guard and pending.guard[0]["reason"] == "controller gone"
    # recover: marks the checkpoint failed, removes the journal; twice is harmless
    assert main(["--state-dir", str(state_dir), "recover"]) == 0
    manifest = json.loads((state_dir / "checkpoints" / "victim" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed" and "died" in manifest["error"]
    assert not (run_dir / "journal" / "victim.jsonl").exists()
    assert main(["--state-dir", str(state_dir), "recover"]) == 0
    for fs in (a, b):
        assert_not_frozen(fs.mount_point)


def test_guard_thaws_at_the_deadline_when_the_controller_is_stuck(
    loop_fs: LoopFactory, tmp_path: Path, state_dir: Path, pace: Pace
) -> None:
    fs = loop_fs("ext4")
    # the controller must freeze and say so within it, before it is stopped
    policy = _policy(tmp_path, [fs], timeout=f"{round(pace.seconds(0.5) * 1000)}ms")
    proc, _ = _start_controller(tmp_path, policy, state_dir)
    try:
        proc.send_signal(signal.SIGSTOP)  # the controller's own deadline thread cannot run now
        probe = start_write(fs.mount_point / "late")
        assert probe.done(pace.seconds(5)), "the guard did not thaw at the deadline"
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        thaw_quietly(fs.mount_point)
    recover(Path(os.environ["SNAPCORE_RUN_DIR"]), None)


def test_recover_runs_at_the_start_of_the_next_checkpoint(
    loop_fs: LoopFactory, tmp_path: Path, state_dir: Path
) -> None:
    fs = loop_fs("ext4")
    run_dir = Path(os.environ["SNAPCORE_RUN_DIR"])
    # a journal left by a controller that died while holding the freeze
    subprocess.run(["fsfreeze", "-f", str(fs.mount_point)], check=True)
    try:
        journal = Journal(run_dir, "crashed")
        journal.open(state_dir=str(state_dir), started="2026-01-01T00:00:00Z")
        journal.record("freeze", key=str(fs), rescue={"kind": "fithaw", "path": str(fs), "argv": []})
        assert journal.fd is not None
        os.close(journal.fd)
        journal.fd = None
        # make the owner look dead: rewrite the begin record with a pid that is gone
        lines = journal.path.read_text().splitlines()
        begin = json.loads(lines[0])
        begin["pid"], begin["pid_start"] = 999_999_999, "0"
        journal.path.write_text("\n".join([json.dumps(begin), *lines[1:]]) + "\n")
        manifest = snapcore.checkpoint([fs], state_dir=state_dir, checkpoint_id="next")
    finally:
        thaw_quietly(fs.mount_point)
    assert any("recovered crashed checkpoint crashed" in w for w in manifest.warnings)
    crashed = json.loads((state_dir / "checkpoints" / "crashed" / "manifest.json").read_text())
    assert crashed["outcome"] == "failed"
    assert_not_frozen(fs.mount_point)


def test_a_second_checkpoint_of_a_mount_fails_at_once_naming_the_holder(
    loop_fs: LoopFactory, tmp_path: Path, state_dir: Path, pace: Pace
) -> None:
    fs = loop_fs("ext4")
    with snapcore.hold([fs], state_dir=state_dir, checkpoint_id="holder"):
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "checkpoint", str(fs), "--id", "second"],
            capture_output=True,
            text=True,
            timeout=pace.seconds(30),
        )
        assert time.monotonic() - start < pace.seconds(5)
    assert result.returncode == 1, result
    assert "being checkpointed already" in result.stderr
    assert "'holder'" in result.stderr and f"pid {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr
    assert_not_frozen(fs.mount_point)


def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom snapcore.host.locks import MountLock\n"
        "MountLock(Path(sys.argv[1]), '/srv', 'x').acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockBusy, match="checkpoint 'x' of pid"):
            MountLock(run_dir, "/srv", "y").acquire()
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
    lock = MountLock(run_dir, "/srv", "y")
    lock.acquire()
    lock.release()


def test_run_dir_on_a_frozen_target_is_refused(loop_fs: LoopFactory, state_dir: Path) -> None:
    fs = loop_fs("ext4")
    run_dir = fs.mount_point / "run"
    with pytest.raises(snapcore.CheckpointFailed, match="run directory"):
        snapcore.checkpoint([fs], state_dir=state_dir, run_dir=run_dir)
    assert_not_frozen(fs.mount_point)


def test_state_dir_writable_by_others_is_refused(loop_fs: LoopFactory, tmp_path: Path) -> None:
    fs = loop_fs("ext4")
    state = tmp_path / "open-state"
    state.mkdir(mode=0o777)
    state.chmod(0o777)
    with pytest.raises(snapcore.CheckpointFailed, match="writable by others"):
        snapcore.checkpoint([fs], state_dir=state)
    assert list(state.iterdir()) == [], "nothing is created in a refused state dir"
    link = tmp_path / "link-state"
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(snapcore.CheckpointFailed, match="symlink"):
        snapcore.checkpoint([fs], state_dir=link)


def test_a_state_dir_someone_else_controls_is_refused_before_anything_is_made(
    loop_fs: LoopFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Owned by another user, or below a directory others can write (not sticky):
    its owner could rename checkpoints/ away and plant manifests for root to act on."""
    fs = loop_fs("ext4")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(snapcore.CheckpointFailed, match="belongs to uid 65534"):
        snapcore.checkpoint([fs], state_dir=theirs)
    assert list(theirs.iterdir()) == []
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    with pytest.raises(snapcore.CheckpointFailed, match="writable by others"):
        snapcore.checkpoint([fs], state_dir=open_parent / "state")
    assert not (open_parent / "state").exists()
    # a sticky, root-owned parent (as /tmp) is fine
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert snapcore.checkpoint([fs], state_dir=sticky / "state", checkpoint_id="ok1").outcome == "ok"
    assert_not_frozen(fs.mount_point)


def test_a_run_dir_someone_else_controls_is_refused_before_anything_is_made(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path
) -> None:
    """The run directory holds the journal (what recover thaws and deletes) and the
    locks: owned by another user, or below a directory others can write, it is refused."""
    fs = loop_fs("ext4")
    theirs = tmp_path / "theirs-run"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(snapcore.CheckpointFailed, match="belongs to uid 65534"):
        snapcore.checkpoint([fs], state_dir=state_dir, run_dir=theirs, checkpoint_id="r1")
    assert list(theirs.iterdir()) == []
    open_parent = tmp_path / "open-run"
    open_parent.mkdir()
    open_parent.chmod(0o777)
    with pytest.raises(snapcore.CheckpointFailed, match="writable by others"):
        snapcore.checkpoint([fs], state_dir=state_dir, run_dir=open_parent / "run", checkpoint_id="r2")
    assert not (open_parent / "run").exists()
    assert_not_frozen(fs.mount_point)


def test_recover_acts_on_no_journal_someone_else_could_have_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A journal tells root what to thaw and delete: one in a directory of another
    user's, or a file of another user's, is not read."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ".x.part").write_text("someone's file")
    planted = [
        {"op": "begin", "id": "evil", "pid": 999999999, "state_dir": str(tmp_path / "state")},
        {"op": "export", "key": "/", "exporter": "tar", "dest": str(victim)},
    ]
    text = "".join(json.dumps(r) + "\n" for r in planted)

    run = tmp_path / "run"
    (run / "journal").mkdir(parents=True, mode=0o700)
    run.chmod(0o700)
    (run / "journal" / "evil.jsonl").write_text(text)
    os.chown(run / "journal" / "evil.jsonl", 65534, 65534)
    assert main(["--run-dir", str(run), "recover"]) == 0
    assert "journal left alone" in capsys.readouterr().out
    assert (run / "journal" / "evil.jsonl").exists() and (victim / ".x.part").exists()

    os.chown(run / "journal" / "evil.jsonl", 0, 0)
    os.chown(run / "journal", 65534, 65534)
    assert main(["--run-dir", str(run), "recover"]) == 1
    assert "belongs to uid 65534" in capsys.readouterr().err
    assert (run / "journal" / "evil.jsonl").exists() and (victim / ".x.part").exists()


def test_a_manifest_someone_else_wrote_or_that_is_no_file_is_refused(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = loop_fs("ext4")
    snapcore.checkpoint([fs], state_dir=state_dir, checkpoint_id="m1")
    path = state_dir / "checkpoints" / "m1" / "manifest.json"
    os.chown(path, 65534, 65534)
    assert main(["--state-dir", str(state_dir), "show", "m1"]) == 1
    assert "someone else could have written" in capsys.readouterr().err
    assert main(["--state-dir", str(state_dir), "delete", "m1"]) == 1
    capsys.readouterr()
    # a FIFO or /dev/zero in its place: refused at once, not waited on or read forever
    path.unlink()
    os.mkfifo(path)
    assert main(["--state-dir", str(state_dir), "show", "m1"]) == 1
    assert "not a regular file" in capsys.readouterr().err
    path.unlink()
    path.symlink_to("/dev/zero")
    assert main(["--state-dir", str(state_dir), "show", "m1"]) == 1
    assert "cannot read the manifest" in capsys.readouterr().err
    # and an export's copy (restore --from) the same
    export = tmp_path / "export"
    export.mkdir()
    os.mkfifo(export / "manifest.json")
    assert main(["--state-dir", str(state_dir), "verify", "--from", str(export)]) == 1
    assert "not a regular file" in capsys.readouterr().err


def test_policy_writable_by_others_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nmounts:\n  /srv: {}\n")
    policy.chmod(0o666)
    assert main(["policy", "check", str(policy)]) == 2
    assert "writable by group or others" in capsys.readouterr().err
    policy.chmod(0o644)
    os.chown(policy, 65534, 65534)
    assert main(["policy", "check", str(policy)]) == 2
    assert "not root" in capsys.readouterr().err


def test_plugin_in_a_world_writable_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapcore.plugins import make_plugins

    site = tmp_path / "site"
    dist = site / "snapcore_evil-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: snapcore-evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[snapcore]\nevil = evil_backend\n")
    (site / "evil_backend.py").write_text("x = 1\n")
    site.chmod(0o777)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SNAPCORE_PLUGINS", "evil")
    plugins = make_plugins()
    assert [b.name for b in plugins.broken] == ["evil"]
    assert "writable by others" in plugins.broken[0].error


def test_plugin_package_under_a_world_writable_directory_is_refused_before_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package (not a lone module) named through ``module:attr``, as snapcore-tar's
    hooks are: refused by where its code lies, and none of it ran."""
    from snapcore.plugins import make_plugins

    ran = tmp_path / "ran"
    site = tmp_path / "site"
    dist = site / "snapcore_evil-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: snapcore-evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[snapcore]\nevil = evil_pkg.hooks:evil\n")
    (site / "evil_pkg").mkdir()
    (site / "evil_pkg" / "__init__.py").write_text(f"open({str(ran)!r}, 'a').write('package\\n')\n")
    (site / "evil_pkg" / "hooks.py").write_text(f"open({str(ran)!r}, 'a').write('hooks\\n')\nevil = object()\n")
    site.chmod(0o777)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SNAPCORE_PLUGINS", "evil")
    plugins = make_plugins()
    assert [b.name for b in plugins.broken] == ["evil"]
    assert f"{site} is writable by others" in plugins.broken[0].error
    assert not ran.exists(), ran.read_text()


def test_manifest_never_written_through_a_planted_symlink(loop_fs: LoopFactory, tmp_path: Path) -> None:
    fs = loop_fs("ext4")
    state = tmp_path / "state"
    (state / "checkpoints").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    victim = tmp_path / "victim"
    victim.mkdir()
    (state / "checkpoints" / "planted").symlink_to(victim)
    with pytest.raises(snapcore.CheckpointFailed, match="symlink"):
        snapcore.checkpoint([fs], state_dir=state, checkpoint_id="planted")
    assert list(victim.iterdir()) == []
    assert_not_frozen(fs.mount_point)
    # refused before anything was frozen or imaged
    assert not (tmp_path / "state" / "checkpoints" / "planted" / "manifest.json").exists()


def test_one_guard_serves_every_checkpoint_of_a_process(loop_fs: LoopFactory, state_dir: Path) -> None:
    from snapcore.safety.deadline import _LINK

    fs = loop_fs("ext4")
    snapcore.checkpoint([fs], state_dir=state_dir)
    pid = _LINK.pid
    assert pid is not None and os.path.exists(f"/proc/{pid}")
    snapcore.checkpoint([fs], state_dir=state_dir)
    assert _LINK.pid == pid


def test_a_guard_that_died_is_started_anew(loop_fs: LoopFactory, state_dir: Path, pace: Pace) -> None:
    from snapcore.safety.deadline import _LINK

    fs = loop_fs("ext4")
    snapcore.checkpoint([fs], state_dir=state_dir)
    old = _LINK.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + pace.seconds(5)
    while time.monotonic() < deadline:  # gone (a zombie until reaped) once /proc says so
        try:
            if Path(f"/proc/{old}/stat").read_text().split()[2] == "Z":
                break
        except OSError:
            break
        time.sleep(0.01)
    manifest = snapcore.checkpoint([fs], state_dir=state_dir)
    assert manifest.outcome == "ok"
    assert _LINK.pid not in (None, old)
    assert_not_frozen(fs.mount_point)


def test_concurrent_checkpoints_share_the_guard_and_each_is_thawed_on_death(
    loop_fs: LoopFactory, tmp_path: Path, state_dir: Path, pace: Pace
) -> None:
    """Two holds in two threads of one controller, killed together: the guard thaws both."""
    a, b = loop_fs("ext4"), loop_fs("ext4")
    ready_a, ready_b = tmp_path / "ready-a", tmp_path / "ready-b"
    code = f"""
import threading, time, snapcore
from pathlib import Path
def hold(fs, ready, cid):
    with snapcore.hold([fs], state_dir={str(state_dir)!r}, checkpoint_id=cid):
        Path(ready).write_text("frozen")
        time.sleep(120)
ts = [threading.Thread(target=hold, args=({str(a)!r}, {str(ready_a)!r}, "ta")),
      threading.Thread(target=hold, args=({str(b)!r}, {str(ready_b)!r}, "tb"))]
for t in ts:
    t.start()
time.sleep(120)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + pace.seconds(30)
        while not (ready_a.exists() and ready_b.exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "the holds never froze"
            time.sleep(0.01)
        probes = [start_write(fs.mount_point / "after") for fs in (a, b)]
        assert not any(p.done(pace.seconds(0.2)) for p in probes)
        proc.kill()
        for probe in probes:
            assert probe.done(pace.seconds(5)), "the guard did not thaw a concurrent checkpoint"
    finally:
        proc.kill()
        proc.wait()
        for fs in (a, b):
            thaw_quietly(fs.mount_point)
    recover(Path(os.environ["SNAPCORE_RUN_DIR"]), None)


def test_a_guard_that_does_not_answer_fails_the_checkpoint_before_any_freeze(
    loop_fs: LoopFactory, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import snapcore.safety.deadline as watchdog

    fs = loop_fs("ext4")
    snapcore.checkpoint([fs], state_dir=state_dir)
    stuck = watchdog._LINK.pid
    assert stuck is not None
    monkeypatch.setattr(watchdog, "ACK_TIMEOUT_S", 0.5)
    os.kill(stuck, signal.SIGSTOP)
    try:
        with pytest.raises(snapcore.CheckpointFailed, match=r"did not answer within 0\.5s") as failed:
            snapcore.checkpoint([fs], state_dir=state_dir, checkpoint_id="unguarded")
        assert failed.value.manifest.outcome == "failed"  # type: ignore[attr-defined]
        assert failed.value.manifest.freeze_window_ms is None  # type: ignore[attr-defined]
        assert_not_frozen(fs.mount_point)
    finally:
        os.kill(stuck, signal.SIGKILL)
        os.kill(stuck, signal.SIGCONT)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(stuck, 0)
    assert snapcore.checkpoint([fs], state_dir=state_dir).outcome == "ok"  # a new guard
    assert watchdog._LINK.pid not in (None, stuck)


class GuardDiesThenFrozenElsewhere:
    """An imager whose freeze first kills the guard (for real), then runs the real
    fsfreeze code on a filesystem someone else froze (a real EBUSY). The fake part is
    only the timing: a guard dying between the freeze notice and a refused freeze
    cannot be caused on demand otherwise."""

    def __init__(self) -> None:
        from snapcore_fsfreeze.backend import Freezer

        self.freezer = Freezer()

    @snapcore.hookimpl
    def snapcore_backend_info(self) -> snapcore.BackendInfo:
        return snapcore.BackendInfo(name="guard-dies", roles=frozenset({snapcore.Role.IMAGER}), description="test")

    @snapcore.hookimpl
    def snapcore_probe(self, mount: snapcore.Mount) -> snapcore.Support:
        return snapcore.Support.yes("test", score=0)

    @snapcore.hookimpl
    def snapcore_rescue(self, target: snapcore.Target) -> snapcore.Rescue:
        return snapcore.Rescue(kind=snapcore.RescueKind.FITHAW, path=target.mount.mount_point)

    @snapcore.hookimpl
    def snapcore_freeze(self, target: snapcore.Target) -> None:
        from snapcore.safety.deadline import _LINK

        assert _LINK.pid is not None
        os.kill(_LINK.pid, signal.SIGKILL)
        os.waitpid(_LINK.pid, 0)
        self.freezer.freeze(target.mount.mount_point, target.mount.mount_point)

    @snapcore.hookimpl
    def snapcore_snapshot(self, target: snapcore.Target) -> snapcore.Image:
        raise AssertionError("never reached: the freeze failed")

    @snapcore.hookimpl
    def snapcore_thaw(self, target: snapcore.Target) -> None:
        self.freezer.thaw(target.mount.mount_point)


def test_fake_timing_a_refused_freeze_keeps_its_own_error_when_the_guard_died_meanwhile(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, pace: Pace
) -> None:
    from snapcore.plugins import make_plugins

    fs = loop_fs("ext4")
    plugins = make_plugins()
    plugins.register(GuardDiesThenFrozenElsewhere(), "guard-dies")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"version: 1\nmounts:\n  {fs.mount_point}:\n    imager: guard-dies\n")
    subprocess.run(["fsfreeze", "-f", str(fs.mount_point)], check=True)  # someone else's freeze
    try:
        with pytest.raises(snapcore.CheckpointFailed, match="EBUSY") as failed:
            snapcore.checkpoint(policy=policy, state_dir=state_dir, plugins=plugins, checkpoint_id="busy")
        assert "guard" not in str(failed.value)
        assert not start_write(fs.mount_point / "x").done(pace.seconds(0.3)), "someone else's freeze was thawed"
    finally:
        thaw_quietly(fs.mount_point)
    assert_not_frozen(fs.mount_point)
    assert snapcore.checkpoint([fs], state_dir=state_dir).outcome == "ok"  # a new guard
