"""snapcore.tasks.criu: finding and checking CRIU, action scripts, and a real dump + restore
of a task snapcore froze, inventoried and watched."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcore.errors import CriuError, CriuUnavailable, SnapcoreError
from snapcore.tasks.changes import ChangeKind, ChangeWatch
from snapcore.tasks.criu import (
    ActionEvent,
    Criu,
    ScriptAction,
    action_from_env,
    check_criu,
    find_criu,
    handle_action,
    parse_version,
)
from snapcore.tasks.freezer import TaskFreezer, recover_temporary_cgroups
from snapcore.tasks.inventory import FileState, copy_ghosts, take_inventory
from snapcore.tasks.resolve import resolve_pid
from snapcore.testing import Pace, machine_pace


def fake_criu(tmp_path: Path, version: str, check_rc: int, check_out: str = "") -> str:
    path = tmp_path / "criu"
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "Version: {version}"; exit 0; fi\n'
        f'if [ "$1" = check ]; then echo "{check_out}" >&2; exit {check_rc}; fi\n'
        "exit 1\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_parse_version() -> None:
    assert parse_version("Version: 4.1.1\n") == (4, 1, 1)
    assert parse_version("Version: 3.17\nGitID: v3.17\n") == (3, 17)
    assert parse_version("nothing") == ()


def test_find_criu(tmp_path: Path) -> None:
    assert find_criu({"CRIU": "/bin/true"}) == "/bin/true"
    with pytest.raises(CriuUnavailable, match="no such executable"):
        find_criu({"CRIU": str(tmp_path / "nope")})
    if not os.access("/usr/local/sbin/criu", os.X_OK):
        with pytest.raises(CriuUnavailable, match=r"setup-criu\.sh"):
            find_criu({"PATH": str(tmp_path)})


def test_check_explains_failures(tmp_path: Path) -> None:
    old = fake_criu(tmp_path, "3.17.1", 0)
    with pytest.raises(CriuUnavailable, match=r"older than 4\.1.*setup-criu\.sh"):
        check_criu(old)
    (tmp_path / "criu").unlink()
    broken = fake_criu(tmp_path, "4.1", 1, "Error (criu/vdso.c:1): vdso: Unexpected rt vDSO area bounds")
    with pytest.raises(CriuUnavailable) as info:
        check_criu(broken)
    assert "check' failed" in str(info.value) and "vDSO" in str(info.value)
    assert isinstance(info.value, SnapcoreError) and info.value.exit_code == 1
    (tmp_path / "criu").unlink()
    ok = fake_criu(tmp_path, "4.2.1", 0)
    assert check_criu(ok) == Criu(path=ok, version=(4, 2, 1))


def test_action_environment() -> None:
    env = {"CRTOOLS_SCRIPT_ACTION": "post-dump", "CRTOOLS_IMAGE_DIR": "/tmp", "CRTOOLS_INIT_PID": "42"}
    event = action_from_env(env)
    assert event == ActionEvent(action="post-dump", images_dir="/tmp", init_pid=42)
    assert event.known is ScriptAction.POST_DUMP
    assert action_from_env({}) is None
    seen: list[ActionEvent] = []
    assert handle_action({"post-dump": seen.append}, env) == 0 and seen == [event]
    # actions without a handler succeed: CRIU runs the script for every action
    assert handle_action({}, {"CRTOOLS_SCRIPT_ACTION": "network-lock"}) == 0

    def fail(event: ActionEvent) -> None:
        raise SnapcoreError("cannot image /srv")

    err = io.StringIO()
    assert handle_action({"post-dump": fail}, env, stderr=err) == 1
    assert "post-dump" in err.getvalue() and "cannot image /srv" in err.getvalue()
    assert handle_action({}, {}, stderr=err) == 2


# -- a real CRIU ----------------------------------------------------------------------


# Holds data.txt open (read) and a deleted file (ghost); appends what both hold to
# report.txt every 20 ms (open-append-close, so report.txt is never held open).
PROGRAM = r"""
import os, time
data = os.open("data.txt", os.O_RDONLY)
ghost = os.open("ghost.txt", os.O_RDONLY)
os.unlink("ghost.txt")
while True:
    line = repr((os.pread(data, 1000, 0), os.pread(ghost, 1000, 0), os.getpid()))
    with open("report.txt", "a") as f:
        f.write(line + "\n")
    time.sleep(0.02)
"""

# CRIU's action script: records what snapcore.tasks.criu.handle_action hands the handlers.
HOOK = r"""#!{python}
import json, sys
from snapcore.tasks.criu import handle_action
def record(event):
    with open({log!r}, "a") as f:
        f.write(json.dumps(event.to_json()) + "\n")
sys.exit(handle_action({{"post-dump": record, "pre-restore": record}}))
"""


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    pids: list[int] = []
    work = tmp_path / "work"
    work.mkdir()
    (work / "pids").write_text("")
    yield work
    for line in (work / "pids").read_text().split():
        pids.append(int(line))
    recover_temporary_cgroups(name=f"criu-test-{os.getpid()}")
    for pid in pids:
        kill(pid)


def reports(work: Path) -> list[tuple[bytes, bytes, int]]:
    try:
        lines = (work / "report.txt").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [ast.literal_eval(line) for line in lines if line.endswith(")")]


def wait_reports(work: Path, n: int, timeout: float = 10.0) -> list[tuple[bytes, bytes, int]]:
    deadline = time.monotonic() + machine_pace().seconds(timeout)
    while len(got := reports(work)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(got)} reports")
        time.sleep(0.02)
    return got


def test_dump_and_restore_a_frozen_watched_task(criu: Criu, workdir: Path, tmp_path: Path, pace: Pace) -> None:
    data = workdir / "data.txt"
    data.write_bytes(b"the bytes the program had")
    (workdir / "ghost.txt").write_bytes(b"a deleted file's bytes")
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # CRIU dumps a tree that leads its session
    )
    with open(workdir / "pids", "a") as f:
        f.write(f"{proc.pid}\n")
    wait_reports(workdir, 2)

    hook_log = tmp_path / "hook.log"
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK.format(python=sys.executable, log=str(hook_log)))
    hook.chmod(0o755)
    images = tmp_path / "images"

    tasks = resolve_pid(proc.pid)
    inventory = take_inventory(tasks.pids)
    watch = ChangeWatch(inventory)
    watch.start()
    with TaskFreezer(tasks, timeout=pace.seconds(5.0), name=f"criu-test-{os.getpid()}") as freezer:
        frozen_at = time.monotonic()
        inventory = copy_ghosts(inventory, tmp_path / "ghosts")
        saved = data.read_bytes()  # stands in for the filesystem image
        assert freezer.criu_freeze_cgroup is not None
        run = criu.dump(proc.pid, images, freeze_cgroup=freezer.criu_freeze_cgroup, action_script=str(hook))
        assert run.elapsed_ms > 0 and (images / "dump.log").exists()
    assert proc.wait(pace.seconds(10)) == -signal.SIGKILL  # dumped without --leave-running
    ghost = next(f for f in inventory.files if f.path == str(workdir / "ghost.txt"))
    assert ghost.state is FileState.DELETED and ghost.ghost is not None and ghost.ghost.path
    assert Path(ghost.ghost.path).read_bytes() == b"a deleted file's bytes"

    # the file changes after the checkpoint: the watch says so
    data.write_bytes(b"CHANGED after the checkpoint, and longer")
    changes = watch.stop()
    assert any(c.path == str(data) and c.kind in (ChangeKind.MODIFY, ChangeKind.TRUNCATE) for c in changes)
    assert all(c.at >= frozen_at for c in changes if c.path == str(data))

    # restore both: the file from the "image", then the task from CRIU's images
    data.write_bytes(saved)
    (workdir / "report.txt").unlink()
    restored = criu.restore(images, action_script=str(hook))
    assert restored.pid == proc.pid
    with open(workdir / "pids", "a") as f:
        f.write(f"{restored.pid}\n")
    after = wait_reports(workdir, 2)
    assert all(r == (b"the bytes the program had", b"a deleted file's bytes", proc.pid) for r in after)
    # the restored task is not left in snapcore's temporary cgroup
    assert "snapcore-" not in Path(f"/proc/{restored.pid}/cgroup").read_text()
    actions = [json.loads(line) for line in hook_log.read_text().splitlines()]
    assert [a["action"] for a in actions] == ["post-dump", "pre-restore"]
    assert actions[0]["images_dir"] == str(images)


def test_failed_restore_says_why(criu: Criu, tmp_path: Path) -> None:
    with pytest.raises(CriuError) as info:
        criu.restore(tmp_path)  # no images here
    assert "criu restore failed" in str(info.value) and "restore.log" in str(info.value)
