"""snapcore.tasks.freezer with real process trees: resolve, freeze, thaw, clean up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapcore.errors import NoSuchTask, NotACgroup, SnapcoreError, UsageError
from snapcore.tasks.cgroups import FreezeMethod, cgroup_hierarchies, task_cgroup
from snapcore.tasks.freezer import TEMP_PREFIX, TaskFreezer, frozen, recover_temporary_cgroups
from snapcore.tasks.resolve import TaskSet, descendants, live, resolve_cgroup, resolve_pid
from snapcore.testing import Pace, machine_pace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="freezing tasks needs root")

# A process that ticks a counter file every 5 ms and forks N children that do the same.
TREE = r"""
import os, sys, time
out, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    if os.fork() == 0:
        break
fd = os.open(f"{out}/tick-{os.getpid()}", os.O_WRONLY | os.O_CREAT, 0o644)
c = 0
while True:
    c += 1
    os.pwrite(fd, b"%012d" % c, 0)
    time.sleep(0.005)
"""

# The parent of the tree (and a sibling in the same cgroup): it keeps ticking and logs
# every wait status of the tree's root (a stop would show up here).
SUPERVISOR = r"""
import os, subprocess, sys, time
out, n, tree = sys.argv[1], sys.argv[2], sys.argv[3]
root = subprocess.Popen([sys.executable, "-c", tree, out, n])
with open(f"{out}/root.pid.tmp", "w") as f:
    f.write(str(root.pid))
os.rename(f"{out}/root.pid.tmp", f"{out}/root.pid")
events = open(f"{out}/events", "a")
fd = os.open(f"{out}/tick-supervisor", os.O_WRONLY | os.O_CREAT, 0o644)
c = 0
while True:
    pid, status = os.waitpid(root.pid, os.WUNTRACED | os.WCONTINUED | os.WNOHANG)
    if pid:
        events.write(f"{status}\n")
        events.flush()
    c += 1
    os.pwrite(fd, b"%012d" % c, 0)
    time.sleep(0.005)
"""


def tick(path: Path) -> int:
    try:
        return int(path.read_bytes() or b"0")
    except (FileNotFoundError, ValueError):
        return 0


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (frozen v2 tasks die too)."""
    pids = descendants(pid) if os.path.exists(f"/proc/{pid}") else [pid]
    for p in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


class Spawner:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, code: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        recover_temporary_cgroups(name=f"test-{os.getpid()}")
        for proc in self.procs:
            kill_tree(proc.pid)
            proc.wait(machine_pace().seconds(10))


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    try:
        yield spawner
    finally:
        spawner.close()


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + machine_pace().seconds(timeout)
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def start_family(spawn: Spawner, out: Path, children: int = 2) -> tuple[subprocess.Popen[bytes], int]:
    """supervisor → tree root → ``children`` children, all ticking; returns (supervisor, root pid)."""
    sup = spawn(SUPERVISOR, str(out), str(children), TREE)
    wait_for(lambda: (out / "root.pid").exists())
    root = int((out / "root.pid").read_text())
    wait_for(lambda: len(list(out.glob("tick-*"))) == children + 2 and len(descendants(root)) == children + 1)
    return sup, root


def ticks(out: Path) -> dict[str, int]:
    return {p.name: tick(p) for p in out.glob("tick-*")}


def advancing(out: Path, wait: float = 0.15) -> set[str]:
    before = ticks(out)
    time.sleep(machine_pace().seconds(wait))
    after = ticks(out)
    return {name for name, value in after.items() if value > before.get(name, 0)}


def test_resolve_pid_finds_the_whole_tree(spawn: Spawner, tmp_path: Path) -> None:
    sup, root = start_family(spawn, tmp_path, children=3)
    tasks = resolve_pid(root)
    assert tasks.root_pid == root and tasks.pids[0] == root
    assert len(tasks.pids) == 4
    assert sup.pid not in tasks.pids
    assert set(resolve_pid(sup.pid).pids) == {sup.pid, *tasks.pids}
    assert tasks.to_json()["pids"] == list(tasks.pids)


@pytest.mark.parametrize("prefer_v1", [False, True], ids=["cgroup2", "v1-freezer"])
def test_freeze_tree_sharing_its_cgroup(spawn: Spawner, tmp_path: Path, prefer_v1: bool, pace: Pace) -> None:
    _v2, v1 = cgroup_hierarchies()
    if prefer_v1 and v1 is None:
        pytest.skip("no v1 freezer mounted")
    sup, root = start_family(spawn, tmp_path)
    tree = resolve_pid(root)
    version = 1 if prefer_v1 else 2
    homes = {pid: task_cgroup(pid, version) for pid in tree.pids}
    assert task_cgroup(sup.pid, version) == homes[root]  # shares the cgroup with its parent
    tree_ticks = {f"tick-{pid}" for pid in tree.pids}
    assert advancing(tmp_path) == tree_ticks | {"tick-supervisor"}

    freezer = TaskFreezer(tree, timeout=pace.seconds(5.0), name=f"test-{os.getpid()}", prefer_v1=prefer_v1)
    with freezer:
        expected = FreezeMethod.CGROUP1_TEMPORARY if prefer_v1 else FreezeMethod.CGROUP2_TEMPORARY
        assert freezer.method is expected
        assert set(freezer.pids) == set(tree.pids)
        # the tree is stopped, its parent (a sibling in the same cgroup) is not
        assert advancing(tmp_path) == {"tick-supervisor"}
        assert all(TEMP_PREFIX in (task_cgroup(pid, version) or "") for pid in tree.pids)
        assert TEMP_PREFIX not in (task_cgroup(sup.pid, version) or "")
        record = freezer.to_json()
        assert record["method"] == expected.value and record["temporary_cgroups"]
        assert "moved into" in record["how"]
        assert freezer.freeze_ms is not None and freezer.freeze_ms < pace.seconds(1.0) * 1000
        temporary = record["temporary_cgroups"]
    assert freezer.thaw_ms is not None
    # what the manifest says after the thaw: what was held, not what still is
    after = freezer.to_json()
    assert set(after["pids"]) == set(tree.pids) and after["temporary_cgroups"] == temporary
    assert f"{len(tree.pids)} task(s) of pid {root} moved into" in after["how"]
    # thawed, moved back home, temporary cgroups gone
    assert advancing(tmp_path) == tree_ticks | {"tick-supervisor"}
    assert {pid: task_cgroup(pid, version) for pid in tree.pids} == homes
    assert not any(os.path.exists(t) for t in temporary)
    # the parent never saw its child stop or continue
    assert not (tmp_path / "events").exists() or (tmp_path / "events").read_text() == ""


def test_freeze_catches_short_lived_children(spawn: Spawner, tmp_path: Path, pace: Pace) -> None:
    # a root that forks a child every 2 ms, each exiting at once: pids appear and vanish
    code = "\n".join(
        [
            "import os, time",
            "while True:",
            "    if os.fork() == 0:",
            "        os._exit(0)",
            "    os.wait()",
            "    time.sleep(0.002)",
        ]
    )
    proc = spawn(code)
    wait_for(lambda: os.path.exists(f"/proc/{proc.pid}/task"))
    for _ in range(5):
        with frozen(resolve_pid(proc.pid), timeout=pace.seconds(5.0), name=f"test-{os.getpid()}") as freezer:
            assert proc.pid in freezer.pids
            state = Path(f"/proc/{proc.pid}/cgroup").read_text()
            assert TEMP_PREFIX in state
    assert live([proc.pid]) == [proc.pid]


def test_freeze_a_whole_cgroup(spawn: Spawner, tmp_path: Path, pace: Pace) -> None:
    v2, _ = cgroup_hierarchies()
    assert v2 is not None
    own = os.path.join(v2.mount_point, f"snapcore-test-cg-{os.getpid()}")
    os.mkdir(own)
    try:
        procs = [spawn(TREE, str(tmp_path), "0") for _ in range(2)]
        wait_for(lambda: len(list(tmp_path.glob("tick-*"))) == 2)
        for p in procs:
            Path(own, "cgroup.procs").write_text(str(p.pid))
        tasks = resolve_cgroup(own)
        assert tasks.cgroup == own and tasks.cgroup_version == 2
        assert set(tasks.pids) == {p.pid for p in procs}
        with TaskFreezer(tasks, timeout=pace.seconds(5.0)) as freezer:
            assert freezer.method is FreezeMethod.CGROUP2
            assert Path(own, "cgroup.freeze").read_text().strip() == "1"
            assert advancing(tmp_path) == set()
            assert own in freezer.describe()
        assert Path(own, "cgroup.freeze").read_text().strip() == "0"
        assert len(advancing(tmp_path)) == 2
        # a cgroup someone else froze stays frozen after our thaw
        Path(own, "cgroup.freeze").write_text("1")
        with TaskFreezer(resolve_cgroup(own), timeout=pace.seconds(5.0)):
            pass
        assert Path(own, "cgroup.freeze").read_text().strip() == "1"
        Path(own, "cgroup.freeze").write_text("0")
    finally:
        for p in spawn.procs:
            kill_tree(p.pid)
            p.wait(pace.seconds(10))
        os.rmdir(own)


def test_bad_pids() -> None:
    with pytest.raises(NoSuchTask, match="no such process"):
        resolve_pid(2**22 + 12345)
    with pytest.raises(NoSuchTask, match="not a process id"):
        resolve_pid(0)
    zombie = subprocess.Popen(["true"])
    wait_for(lambda: (Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0]) == "Z")
    try:
        with pytest.raises(NoSuchTask, match="exiting"):
            resolve_pid(zombie.pid)
    finally:
        zombie.wait()


def test_pid_exiting_before_the_freeze(spawn: Spawner) -> None:
    proc = spawn("import time; time.sleep(30)")
    tasks = resolve_pid(proc.pid)
    proc.kill()
    proc.wait()
    with pytest.raises(NoSuchTask) as info, TaskFreezer(tasks, name=f"test-{os.getpid()}"):
        raise AssertionError("not reached")
    assert info.value.exit_code == 2
    assert recover_temporary_cgroups(name=f"test-{os.getpid()}") == []


def test_refuses_to_freeze_itself() -> None:
    # snapcore's own parent chain: refused before anything is moved
    with pytest.raises(UsageError, match="cannot freeze itself"):
        TaskFreezer(resolve_pid(os.getppid()), name=f"test-{os.getpid()}").attach()
    v2, _ = cgroup_hierarchies()
    assert v2 is not None
    mine = v2.dir_of(task_cgroup(os.getpid(), 2) or "/")
    if mine is not None and mine != v2.mount_point:
        with pytest.raises(UsageError, match="cannot freeze itself"):
            TaskFreezer(resolve_cgroup(mine)).attach()


def test_not_a_cgroup(tmp_path: Path) -> None:
    with pytest.raises(NotACgroup, match="not a cgroup"):
        resolve_cgroup(tmp_path)
    v2, v1 = cgroup_hierarchies()
    assert v2 is not None
    with pytest.raises(NotACgroup, match="root cgroup"):
        resolve_cgroup(v2.mount_point)
    with pytest.raises(NotACgroup, match="no such cgroup"):
        resolve_cgroup(os.path.join(v2.mount_point, "snapcore-no-such-cgroup"))
    if v1 is not None:
        with pytest.raises(NotACgroup, match="root cgroup"):
            resolve_cgroup(v1.mount_point)
    assert issubclass(NotACgroup, SnapcoreError)


def test_recover_after_a_crash(spawn: Spawner, tmp_path: Path, pace: Pace) -> None:
    _sup, root = start_family(spawn, tmp_path, children=1)
    freezer = TaskFreezer(resolve_pid(root), timeout=pace.seconds(5.0), name=f"test-{os.getpid()}")
    freezer.attach()
    freezer.freeze()
    assert advancing(tmp_path) == {"tick-supervisor"}
    # the controller "dies" here: recover thaws and removes what it left
    done = recover_temporary_cgroups(name=f"test-{os.getpid()}")
    assert len(done) == 1 and not os.path.exists(done[0])
    assert len(advancing(tmp_path)) == 3
    assert TEMP_PREFIX not in (task_cgroup(root, 2) or "")


def test_taskset_json_round_trip() -> None:
    tasks = TaskSet(pids=(1, 2), root_pid=1)
    assert tasks.to_json() == {"root_pid": 1, "cgroup": None, "cgroup_version": None, "pids": [1, 2]}
