"""The --container wrapper's pieces that read untrusted input: the relay's request
lines (written by a script CRIU runs), the runtime's state answer, the command line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snapcore.errors import SnapcoreError, UsageError
from snapcore.tasks.relay import Relay, Request, parse
from snapcore.tasks.runtimes import ContainerRef, _status_and_pid, checkpoint_command


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"post-dump 4242 /proc/77/fd/5\n", Request("post-dump", 4242, "/proc/77/fd/5")),
        (b"post-dump 4242 /var/ckpt/a dir with spaces", Request("post-dump", 4242, "/var/ckpt/a dir with spaces")),
        (b"pre-restore 4242 /proc/77/fd/5", None),
        (b"post-dump 1 /proc/77/fd/5", None),
        (b"post-dump 0 -", None),
        (b"post-dump -5 /x", None),
        (b"post-dump 42 relative/path", None),
        (b"post-dump 42", None),
        (b"post-dump 42 /x\x00y", None),
        (b"\xff\xfe 42 /x", None),
        (b"", None),
    ],
)
def test_relay_reads_only_well_formed_requests(line: bytes, expected: Request | None) -> None:
    assert parse(line) == expected


def test_relay_script_answers_and_never_waits_on_a_dead_snapcore(tmp_path: Path) -> None:
    """The relay's script, run as CRIU runs it: an ignored action returns at once; at
    post-dump it relays the request, prints the answer; with the relay closed (its
    process gone) it fails at once instead of waiting."""
    env = {"PATH": os.environ["PATH"], "CRTOOLS_INIT_PID": "4242", "CRTOOLS_IMAGE_DIR": "/proc/7/fd/5"}
    with Relay(tmp_path / "relay", timeout_s=30) as relay:
        ignored = subprocess.run([relay.script], env={**env, "CRTOOLS_SCRIPT_ACTION": "pre-dump"}, timeout=10)
        assert ignored.returncode == 0
        relay.answer("ok 20261205T000000Z-abcd")  # answered before it is asked: the FIFO keeps it
        done = subprocess.run(
            [relay.script],
            env={**env, "CRTOOLS_SCRIPT_ACTION": "post-dump"},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.returncode == 0 and "checkpoint 20261205T000000Z-abcd" in done.stderr
        assert relay._requests() == [Request("post-dump", 4242, "/proc/7/fd/5")]
        relay.answer("error a needed file changed\nsecond line")
        failed = subprocess.run(
            [relay.script],
            env={**env, "CRTOOLS_SCRIPT_ACTION": "post-dump"},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert failed.returncode == 1 and "a needed file changed second line" in failed.stderr
        script = relay.script.read_text()
    # the relay's directory is gone with it; a script left behind finds no FIFO
    assert not relay.dir.exists()
    stale = tmp_path / "stale-script"
    stale.write_text(script)
    stale.chmod(0o700)
    gone = subprocess.run(
        [stale], env={**env, "CRTOOLS_SCRIPT_ACTION": "post-dump"}, capture_output=True, text=True, timeout=10
    )
    assert gone.returncode != 0


def test_container_refs_and_commands() -> None:
    assert ContainerRef.parse("runc:web1") == ContainerRef("runc", "web1")
    for bad in ("web1", "docker:web1", "runc:", "runc:-x", "runc:a b"):
        with pytest.raises(UsageError):
            ContainerRef.parse(bad)
    ref = ContainerRef("runc", "web1")
    assert checkpoint_command(ref, None) == ["runc", "checkpoint", "web1"]
    assert checkpoint_command(ref, ["runc", "--root", "/r", "checkpoint", "--image-path", "/i", "web1"])
    for bad_cmd in (["runc", "restore", "web1"], ["runc", "checkpoint", "web2"], ["podman", "checkpoint", "web1"]):
        with pytest.raises(UsageError):
            checkpoint_command(ref, bad_cmd)
    pod = ContainerRef("podman", "web")
    assert checkpoint_command(pod, None) == ["podman", "container", "checkpoint", "web"]


@pytest.mark.parametrize(
    ("runtime", "text", "expected"),
    [
        ("runc", '{"status": "running", "pid": 42}', ("running", 42)),
        ("runc", '{"status": "paused", "pid": 42}', ("paused", 42)),
        ("podman", "running 42\n", ("running", 42)),
        ("runc", '{"status": "running", "pid": "42"}', None),
        ("runc", '{"status": "running", "pid": true}', None),
        ("runc", '{"status": ["running"], "pid": 42}', None),
        ("runc", "[]", None),
        ("runc", "not json", None),
        ("podman", "running", None),
        ("podman", "running 42 extra", None),
        ("podman", "running x", None),
    ],
)
def test_runtime_state_is_read_as_untrusted(runtime: str, text: str, expected: tuple[str, int] | None) -> None:
    ref = ContainerRef(runtime, "web")
    if expected is None:
        with pytest.raises(SnapcoreError, match="state is not what snapcore reads"):
            _status_and_pid(ref, text)
    else:
        assert _status_and_pid(ref, text) == expected
