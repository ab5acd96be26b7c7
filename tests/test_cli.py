"""Bad input gets one clear line and the right exit code, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapcore.cli import main
from snapcore.testing import LoopFactory, Pace, machine_pace

SNAPCORE = [sys.executable, "-m", "snapcore"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SNAPCORE, *args], capture_output=True, text=True, env=env, timeout=machine_pace().seconds(60)
    )


def one_clean_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("snapcore: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["checkpoint", "--policy", "/nonexistent.yaml"], 2, "/nonexistent.yaml: no such file"),
        (["checkpoint", "/nonexistent/path"], 2, "/nonexistent/path: no such file"),
        (["checkpoint", "/proc/self"], 2, "proc pseudo filesystem"),
        (["checkpoint"], 2, "nothing to checkpoint"),
        (["checkpoint", "/tmp", "--", "no-such-command-xyz"], 2, "command not found: no-such-command-xyz"),
        (["plan", "/sys/kernel"], 2, "sysfs pseudo filesystem"),
        (["show", "nope"], 2, "no checkpoint 'nope'"),
        (["show", "../etc"], 2, "bad checkpoint id"),
        (["show", "nl\n"], 2, "bad checkpoint id"),
        (["checkpoint", "/tmp", "--id", "nl\n"], 2, "bad checkpoint id"),
        (["frobnicate"], 2, "invalid choice"),
        (["list", "--", "x"], 2, "only for 'snapcore checkpoint'"),
        (["restore", "x"], 2, "one of the arguments --to --in-place is required"),
        (["checkpoint", "/tmp", "--send-images", "--", "sleep", "0"], 2, "need '-- criu dump ... -D DIR'"),
        (["checkpoint", "/tmp", "--hand-off", "5s", "--", "criu", "dump", "-t", "1"], 2, "give --pid, --cgroup or"),
        (["checkpoint", "--pid", "1", "--hand-off", "0s", "--", "criu", "dump", "-t", "1"], 2, "greater than 0"),
        (
            [
                "checkpoint",
                "--hand-off",
                "5s",
                "--container",
                "runc:c1",
                "--",
                "runc",
                "checkpoint",
                "--leave-running",
                "c1",
            ],
            2,
            "must not say --leave-running",
        ),
    ],
)
def test_bad_input(args: list[str], code: int, fragment: str, tmp_path: Path) -> None:
    result = run("--state-dir", str(tmp_path), *args)
    assert result.returncode == code, result
    assert fragment in one_clean_line(result.stderr)


def test_unknown_backend_in_policy(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nmounts:\n  /tmp:\n    imager: lvm\n")
    result = run("--state-dir", str(tmp_path), "checkpoint", "--policy", str(policy))
    assert result.returncode == 2
    line = one_clean_line(result.stderr)
    assert f"{policy}:4" in line and "mount /tmp" in line and "unknown backend 'lvm'" in line


def test_not_root(tmp_path: Path, pace: Pace) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    tmp_path.chmod(0o755)
    env = dict(os.environ, SNAPCORE_STATE_DIR=str(tmp_path / "s"), HOME="/")
    result = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *SNAPCORE, "checkpoint", "/tmp"],
        capture_output=True,
        text=True,
        env=env,
        timeout=pace.seconds(60),
    )
    assert result.returncode == 2
    assert "must run as root" in one_clean_line(result.stderr)


def test_failed_checkpoint_exits_1_with_one_error_line(loop_fs: LoopFactory, tmp_path: Path) -> None:
    fs = loop_fs("ext4")
    result = run("--state-dir", str(tmp_path), "checkpoint", str(fs), "--id", "f", "--", "false")
    assert result.returncode == 1
    assert "exited with status 1" in one_clean_line(result.stderr)
    assert "checkpoint f: failed" in result.stdout


def test_help_is_fast_and_lists_commands(pace: Pace) -> None:
    start = time.perf_counter()
    result = run("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0
    for command in ("backends", "plan", "checkpoint", "list", "show", "restore", "verify", "policy"):
        assert command in result.stdout
    assert elapsed < pace.seconds(5)  # the real figure (< 150 ms) is measured by bench/freeze.py


def test_main_returns_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--state-dir", str(tmp_path), "list"]) == 0
    assert main(["--state-dir", str(tmp_path), "list", "--json"]) == 0
    assert capsys.readouterr().out.strip().endswith("[]")
