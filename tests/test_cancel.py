"""Cancelling a checkpoint: the Cancel switch, signals, the API, and the CLI's payload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import snapcore
from snapcore import Cancel, Cancelled, CheckpointFailed
from snapcore.safety.cancel import on_signals, tied_to_controller
from snapcore.testing import LoopFactory, Pace, assert_not_frozen, start_write, wait_for_path

SNAPCORE = [sys.executable, "-m", "snapcore"]

# -- the switch ------------------------------------------------------------------------


def test_cancel_runs_each_callback_once_and_keeps_the_first_reason() -> None:
    cancel = Cancel()
    calls: list[str] = []
    with cancel.on_cancel(lambda: calls.append("a")):
        cancel.check()  # not set: nothing raised
        cancel.set("first")
        cancel.set("second")
    assert calls == ["a"]
    assert cancel.reason == "first" and cancel.is_set()
    with pytest.raises(Cancelled, match=r"^cancelled \(first\)$"):
        cancel.check()


def test_a_callback_registered_after_the_cancel_runs_at_once_and_is_gone_after_its_block() -> None:
    cancel = Cancel()
    calls: list[str] = []
    with cancel.on_cancel(lambda: calls.append("late")):
        pass
    cancel.set("x")
    assert calls == []  # unregistered when its block ended
    with cancel.on_cancel(lambda: calls.append("now")):
        assert calls == ["now"]


def test_a_failing_callback_does_not_stop_the_others() -> None:
    cancel = Cancel()
    calls: list[str] = []

    def broken() -> None:
        raise ProcessLookupError("already gone")

    with cancel.on_cancel(broken), cancel.on_cancel(lambda: calls.append("b")):
        cancel.set("x")
    assert calls == ["b"]


def test_signals_cancel_inside_the_block_and_the_old_handlers_come_back(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    cancel = Cancel()
    with on_signals(cancel):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs on the main thread, between bytecodes
            if cancel.is_set():
                break
            time.sleep(0.001)
    assert cancel.reason == "SIGINT received"
    assert "snapcore: SIGINT: cancelling the checkpoint" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_tied_child_dies_with_the_thread_that_started_it(tmp_path: Path, pace: Pace) -> None:
    """``setpriv --pdeathsig``: the child of a killed controller does not go on."""
    ready = tmp_path / "ready"
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen({tied_to_controller(['sleep', '300'])!r})\n"
        f"open({str(ready)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for_path(ready, parent, pace.seconds(10), "the parent")
        while not ready.read_text():
            time.sleep(0.01)
        child = int(ready.read_text())
        # setpriv sets the death signal, then execs sleep: wait for the exec
        deadline = time.monotonic() + pace.seconds(10)
        while not Path(f"/proc/{child}/cmdline").read_bytes().startswith(b"sleep\0"):
            assert time.monotonic() < deadline, "setpriv never ran sleep"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + pace.seconds(5)
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the tied child outlived its parent"
        time.sleep(0.01)


# -- the transaction ---------------------------------------------------------------------


@pytest.mark.usefixtures("root_only")
def test_a_checkpoint_cancelled_by_its_payload_fails(loop_fs: LoopFactory, state_dir: Path) -> None:
    """(That a cancelled checkpoint's images and exports are removed is tested with
    real images by the tar plugin's tests: the core's tests have fsfreeze alone.)"""
    fs = loop_fs("ext4")
    cancel = Cancel()

    def payload(checkpoint: snapcore.Checkpoint) -> int:
        cancel.set("the caller changed its mind")
        return 0  # the payload itself succeeded

    with pytest.raises(CheckpointFailed, match=r"cancelled \(the caller changed its mind\)") as info:
        snapcore.checkpoint([fs], state_dir=state_dir, checkpoint_id="c1", payload=payload, cancel=cancel)

    manifest = info.value.manifest
    assert isinstance(manifest, snapcore.Manifest)
    assert manifest.outcome == "failed" and manifest.targets[0].outcome == "failed"
    assert_not_frozen(fs.mount_point)
    assert json.loads((state_dir / "checkpoints" / "c1" / "manifest.json").read_text())["outcome"] == "failed"


@pytest.mark.usefixtures("root_only")
def test_a_hold_cancelled_from_another_thread_thaws_and_fails(
    loop_fs: LoopFactory, state_dir: Path, pace: Pace
) -> None:
    fs = loop_fs("ext4")
    cancel = Cancel()
    held = snapcore.hold([fs], state_dir=state_dir, checkpoint_id="h1", cancel=cancel)
    with pytest.raises(CheckpointFailed, match=r"cancelled \(operator\)"), held:
        probe = start_write(fs.mount_point / "during")
        assert not probe.done(pace.seconds(0.2)), "the filesystem is frozen in the body"
        threading.Thread(target=cancel.set, args=("operator",)).start()
        cancel.wait(pace.seconds(5))
    assert probe.done(pace.seconds(10))
    assert_not_frozen(fs.mount_point)


@pytest.mark.usefixtures("root_only")
def test_sigterm_during_the_payload_stops_it_and_fails_the_checkpoint(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, pace: Pace
) -> None:
    """The CLI as a job manager runs it: SIGTERM to snapcore alone (a session of its
    own) reaches the payload too, which must not be left running."""
    fs = loop_fs("ext4")
    ready = tmp_path / "payload.pid"
    sleep_s = 300
    payload = ["sh", "-c", f"echo $$ > {ready}.tmp && mv {ready}.tmp {ready} && exec sleep {sleep_s}"]
    proc = subprocess.Popen(
        [*SNAPCORE, "--state-dir", str(state_dir), "checkpoint", str(fs), "--id", "p1", "--", *payload],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_path(ready, proc, pace.seconds(30), "the payload")
    sleeper = int(ready.read_text())
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=pace.seconds(30))

    assert proc.returncode == 1, stderr
    assert time.monotonic() - t < sleep_s / 2, "it waited for the payload rather than stopping it"
    assert "snapcore: error: cancelled (SIGTERM received)" in stderr and "Traceback" not in stderr
    assert not Path(f"/proc/{sleeper}").exists() or "Z" in Path(f"/proc/{sleeper}/stat").read_text().split()[2]
    manifest = json.loads((state_dir / "checkpoints" / "p1" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed" and manifest["payload"]["status"] == -signal.SIGTERM
    assert_not_frozen(fs.mount_point)
