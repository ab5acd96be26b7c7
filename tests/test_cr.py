"""The checkpoint/restart sequence through the transaction: --pid, inventory, ghosts,
change watch, task freezing around the filesystems, and CRIU as the payload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcore.cli import main
from snapcore.tasks.criu import Criu
from snapcore.testing import LoopFactory, Pace, assert_not_frozen, wait_for_path

pytestmark = pytest.mark.usefixtures("root_only")

HOLDER = """
import os, sys, time
path, ready, mode = sys.argv[1], sys.argv[2], sys.argv[3]
f = open(path, "w+")
f.write("original bytes\\n"); f.flush()
if mode == "delete":
    os.unlink(path)
os.chdir(os.path.dirname(path))
with open(ready + ".tmp", "w") as r:  # appears whole: a reader never sees it empty
    r.write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
while True:
    time.sleep(0.05)
"""


def _start(script: str, *args: str, ready: Path, pace: Pace, what: str) -> subprocess.Popen[bytes]:
    """``python -c SCRIPT ARGS`` in a session of its own, returned once it made ``ready``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_path(ready, proc, pace.seconds(20), what)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _start_orphan(script: str, *args: str, ready: Path, pace: Pace, what: str) -> str:
    """``python -c SCRIPT ARGS`` started as a user's background job: through a shell
    that exits at once (its parent is PID 1), in a session of its own (CRIU wants a
    session leader). Returns what it wrote in ``ready``."""
    line = 'setsid "$0" -c "$@" </dev/null >/dev/null 2>&1 &'
    subprocess.run(["sh", "-c", line, sys.executable, script, *args], check=True)
    deadline = time.monotonic() + pace.seconds(20)
    while not ready.exists():
        assert time.monotonic() < deadline, f"the {what} did not start"
        time.sleep(0.01)
    return ready.read_text()


@pytest.fixture
def holder(tmp_path: Path, pace: Pace) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(path: Path, mode: str = "keep") -> subprocess.Popen[bytes]:
        ready = tmp_path / f"ready-{len(procs)}"
        proc = _start(HOLDER, str(path), str(ready), mode, ready=ready, pace=pace, what="holder")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _state(proc: subprocess.Popen[bytes]) -> str:
    with open(f"/proc/{proc.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_pid_checkpoint_targets_the_mounts_the_task_uses(
    loop_fs: LoopFactory, state_dir: Path, holder: object, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = loop_fs("ext4")
    proc = holder(fs.mount_point / "data.txt")  # type: ignore[operator]
    code = main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "t1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    manifest = json.loads(out)
    assert [t["mount"] for t in manifest["targets"]] == [str(fs.mount_point)]
    assert any("root filesystem" in w for w in manifest["warnings"])
    assert manifest["tasks"]["method"]
    # the manifest says which tasks were held, though they are thawed and moved back by now
    assert proc.pid in manifest["tasks"]["pids"] and manifest["tasks"]["temporary_cgroups"]
    assert f"task(s) of pid {proc.pid} moved into" in manifest["tasks"]["how"]
    assert not manifest["tasks"]["how"].startswith(manifest["tasks"]["method"] + ": 0 task(s)")
    files = {f["path"]: f for f in manifest["files"]}
    data = files[str(fs.mount_point / "data.txt")]
    assert data["state"] == "present" and data["size"] == len("original bytes\n")
    assert manifest["changes"] == []
    assert _state(proc) in "SR", "the task was not thawed"
    assert_not_frozen(fs.mount_point)


def test_deleted_open_file_is_copied_as_a_ghost(loop_fs: LoopFactory, state_dir: Path, holder: object) -> None:
    fs = loop_fs("xfs")
    proc = holder(fs.mount_point / "ghost.txt", "delete")  # type: ignore[operator]
    assert main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "g1"]) == 0
    manifest = json.loads((state_dir / "checkpoints" / "g1" / "manifest.json").read_text())
    ghost_file = next(f for f in manifest["files"] if f["deleted"])
    assert ghost_file["state"] == "deleted"
    assert Path(ghost_file["ghost"]["path"]).read_bytes() == b"original bytes\n"


def test_deleted_non_pie_binary_is_found_and_copied(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, pace: Pace
) -> None:
    """A static, non-PIE program (busybox) is mapped below 0x10000000, where
    ``/proc/PID/maps`` pads the address and ``map_files`` does not: its binary, deleted
    while it runs, is the only thing that ties the task to the mount."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("no /bin/busybox (apt-get install busybox-static)")
    fs = loop_fs("ext4")
    program = fs.mount_point / "busybox"
    program.write_bytes(busybox.read_bytes())
    program.chmod(0o755)
    proc = subprocess.Popen(
        [str(program), "sleep", "600"], cwd=tmp_path, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + pace.seconds(10)
        while str(program) not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert time.monotonic() < deadline, "busybox never mapped"
            time.sleep(0.01)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert int(maps.split("-", 1)[0], 16) < 0x10000000, "busybox is not mapped low: not the case under test"
        program.unlink()
        code = main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "bb"])
        assert code == 0
        manifest = json.loads((state_dir / "checkpoints" / "bb" / "manifest.json").read_text())
        assert [t["mount"] for t in manifest["targets"]] == [str(fs.mount_point)]
        found = next(f for f in manifest["files"] if f["path"] == str(program))
        assert found["state"] == "deleted" and found["mapped"]
        assert Path(found["ghost"]["path"]).read_bytes() == busybox.read_bytes()
    finally:
        proc.kill()
        proc.wait()
    assert_not_frozen(fs.mount_point)


@pytest.mark.parametrize("on_change", ["fail", "warn"])
def test_a_change_under_the_frozen_task_decides(
    loop_fs: LoopFactory, state_dir: Path, holder: object, tmp_path: Path, on_change: str
) -> None:
    fs = loop_fs("ext4")
    target = fs.mount_point / "data.txt"
    proc = holder(target)  # type: ignore[operator]
    policy = tmp_path / "p.yaml"
    policy.write_text(f"version: 1\nmounts:\n  {fs.mount_point}:\n    imager: fsfreeze\n    on_change: {on_change}\n")
    # the payload runs while the task is frozen: it changes the file under it
    code = main(
        [
            *["--state-dir", str(state_dir), "checkpoint", "--policy", str(policy), "--pid", str(proc.pid)],
            *["--id", f"c-{on_change}", "--", "sh", "-c", f"echo tampered >> {target}"],
        ]
    )
    manifest = json.loads((state_dir / "checkpoints" / f"c-{on_change}" / "manifest.json").read_text())
    kinds = {c["kind"] for c in manifest["changes"]}
    assert "modify" in kinds, manifest["changes"]
    if on_change == "fail":
        assert code == 1 and manifest["outcome"] == "failed"
        assert "changed" in manifest["error"] and str(target) in manifest["error"]
    else:
        assert code == 0 and any(str(target) in w for w in manifest["warnings"])
    assert _state(proc) in "SR"
    assert_not_frozen(fs.mount_point)


WRITER = """
import os, sys, time
path, ready = sys.argv[1:3]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
open(ready + ".tmp", "w").close(); os.rename(ready + ".tmp", ready)
while True:
    os.write(fd, b"tick\\n")
    time.sleep(0.001)
"""


def test_writes_the_task_made_before_its_freeze_are_no_change_even_read_late_FAKE_LATE_READER(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task writing its needed file up to the moment it freezes: its own writes are
    no change under it. The watch stamps an event when it reads it; on a busy machine
    its reader thread ran late and the task's last writes were taken for changes after
    the freeze (seen once in a full run). The fake: a watch with no reader thread at
    all, the latest a reader can be (a scheduler's delay cannot be caused on demand)."""
    from snapcore.tasks import changes

    class LateReader(changes.ChangeWatch):
        def __init__(self, files: object, **kw: object) -> None:
            super().__init__(files, fanotify=True, thread=False)  # type: ignore[arg-type]

    monkeypatch.setattr(changes, "ChangeWatch", LateReader)
    fs = loop_fs("ext4")
    ready = tmp_path / "ready"
    proc = _start(WRITER, str(fs.mount_point / "log"), str(ready), ready=ready, pace=pace, what="writer")
    try:
        time.sleep(0.05)  # writing steadily
        code = main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "late"])
        manifest = json.loads((state_dir / "checkpoints" / "late" / "manifest.json").read_text())
        assert code == 0 and manifest["changes"] == [], manifest.get("error")
        assert _state(proc) in "SR"
    finally:
        proc.kill()
        proc.wait()
    assert_not_frozen(fs.mount_point)


TWO_FILES = """
import os, sys, time
keep, gone, ready = sys.argv[1:4]
a = open(keep, "r+"); b = open(gone, "w+"); b.write("deleted but open\\n"); b.flush(); os.unlink(gone)
open(ready + ".tmp", "w").close(); os.rename(ready + ".tmp", ready)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("on_change", ["fail", "warn"])
def test_a_file_renamed_over_under_the_frozen_task_keeps_its_old_content(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, pace: Pace, on_change: str
) -> None:
    """The atomic-save pattern (write a temporary file, rename it over the config)
    while the task is stopped: with on_change: warn, the content the task still has
    open is saved as a ghost; a failed checkpoint keeps no ghost copies at all."""
    fs = loop_fs("ext4")
    config, scratch, ready = fs.mount_point / "config.json", fs.mount_point / "scratch", tmp_path / "ready"
    config.write_text('{"version": 1}\n')
    proc = _start(TWO_FILES, str(config), str(scratch), str(ready), ready=ready, pace=pace, what="holder")
    try:
        policy = tmp_path / "p.yaml"
        policy.write_text(
            f"version: 1\nmounts:\n  {fs.mount_point}:\n    imager: fsfreeze\n    on_change: {on_change}\n"
        )
        save = f"echo '{{\"version\": 2}}' > {config}.tmp && mv {config}.tmp {config}"
        code = main(
            [
                *["--state-dir", str(state_dir), "checkpoint", "--policy", str(policy), "--pid", str(proc.pid)],
                *["--id", "rn", "--", "sh", "-c", save],
            ]
        )
        manifest = json.loads((state_dir / "checkpoints" / "rn" / "manifest.json").read_text())
        files = {f["path"]: f for f in manifest["files"]}
        renamed, deleted = files[str(config)], files[str(scratch)]
        assert renamed["state"] == "renamed-over" and deleted["state"] == "deleted"
        ghosts = state_dir / "checkpoints" / "rn" / "ghosts"
        if on_change == "warn":
            assert code == 0
            assert Path(renamed["ghost"]["path"]).read_text() == '{"version": 1}\n'
            assert Path(deleted["ghost"]["path"]).read_text() == "deleted but open\n"
        else:
            assert code == 1 and manifest["outcome"] == "failed"
            assert not ghosts.exists()
            assert deleted["ghost"]["path"] is None and deleted["ghost"]["note"] == "removed: the checkpoint failed"
        assert _state(proc) in "SR"
    finally:
        proc.kill()
        proc.wait()
    assert_not_frozen(fs.mount_point)


def test_bad_pid_and_cgroup(state_dir: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--state-dir", str(state_dir), "checkpoint", "--pid", "999999999"]) == 2
    assert main(["--state-dir", str(state_dir), "checkpoint", "--cgroup", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("snapcore: error:") == 2


@pytest.fixture
def criu_and_btrfs(
    monkeypatch: pytest.MonkeyPatch, loop_fs: LoopFactory, tmp_path: Path, criu: Criu
) -> tuple[Criu, Path]:
    """A working CRIU, the btrfs backend, and a btrfs subvolume mounted on its own
    (so that it can be rolled back in place)."""
    from snapcore.plugins import make_plugins

    monkeypatch.setenv("SNAPCORE_PLUGINS", "btrfs,fsfreeze")
    if "btrfs" not in make_plugins().backends:
        pytest.skip("the btrfs backend is not installed")
    return criu, loop_fs("btrfs").mount_subvolume("data", tmp_path / "data-mount")


def test_criu_dump_and_restore_with_a_btrfs_image(
    criu_and_btrfs: tuple[Criu, Path], state_dir: Path, holder: object, tmp_path: Path, pace: Pace
) -> None:
    criu, mnt = criu_and_btrfs
    data = mnt / "data.txt"
    proc = holder(data)  # type: ignore[operator]
    images = tmp_path / "criu-images"
    images.mkdir()
    code = main(
        [
            *["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "cr1", "--"],
            *[criu.path, "dump", "-t", str(proc.pid), "-D", str(images), "--log-file", "dump.log"],
        ]
    )
    assert code == 0, (images / "dump.log").read_text()[-2000:]
    manifest = json.loads((state_dir / "checkpoints" / "cr1" / "manifest.json").read_text())
    assert manifest["criu"]["images_dir"] == str(images)
    assert "--freeze-cgroup" in manifest["criu"]["argv"]
    assert manifest["targets"][0]["imager"] == "btrfs"
    # taken while the tasks were stopped: nothing they wrote raced the snapshot
    assert manifest["targets"][0]["consistency"] == "tasks-frozen"
    assert 0 < manifest["tasks"]["stopped_ms"] >= manifest["freeze_window_ms"]
    proc.wait(pace.seconds(10))  # criu dump ends the dumped tasks
    data.write_text("changed after the checkpoint, longer than before\n")
    # files back from the image, then CRIU: the program must find the bytes it had
    code = main(
        [
            *["--state-dir", str(state_dir), "restore", "cr1", "--in-place", "--"],
            *[criu.path, "restore", "-D", str(images), "-d", "--manage-cgroups=ignore", "--log-file", "restore.log"],
        ]
    )
    assert code == 0, (images / "restore.log").read_text()[-2000:]
    try:
        assert data.read_text() == "original bytes\n"
        fd_target = next(Path(f"/proc/{proc.pid}/fd").iterdir())
        assert fd_target.exists()
    finally:
        subprocess.run(["kill", "-9", str(proc.pid)], check=False)


def test_restore_in_place_of_a_busy_mount_does_not_start_the_program(
    criu_and_btrfs: tuple[Criu, Path],
    state_dir: Path,
    holder: object,
    tmp_path: Path,
    pace: Pace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The soak's finding: with any process in the mount, the rollback cannot show
    now, and CRIU must not restore the program onto the old tree."""
    criu, mnt = criu_and_btrfs
    data = mnt / "data.txt"
    proc = holder(data)  # type: ignore[operator]
    images = tmp_path / "criu-images"
    images.mkdir()
    dump = [criu.path, "dump", "-t", str(proc.pid), "-D", str(images), "--log-file", "dump.log"]
    assert (
        main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "busy1", "--", *dump]) == 0
    )
    proc.wait(pace.seconds(10))
    data.write_text("changed after the checkpoint, longer than before\n")
    blocker = subprocess.Popen(["sleep", "600"], cwd=mnt, start_new_session=True)
    restore = [criu.path, "restore", "-D", str(images), "-d", "--manage-cgroups=ignore", "--log-file", "restore.log"]
    capsys.readouterr()
    try:
        code = main(["--state-dir", str(state_dir), "restore", "busy1", "--in-place", "--", *restore])
        err = capsys.readouterr().err
        assert code == 1
        assert f"pid {blocker.pid} (sleep: cwd)" in err and "nothing was changed" in err and "--to DIR" in err
        # CRIU was not run, the tree is untouched and nothing was set aside
        assert not (images / "restore.log").exists() and not os.path.exists(f"/proc/{proc.pid}")
        assert data.read_text() == "changed after the checkpoint, longer than before\n"
        assert not list((state_dir / "checkpoints").glob("before-restore-*"))
    finally:
        blocker.kill()
        blocker.wait()
    # the holder gone, the same command works, and the replaced state is a checkpoint
    code = main(["--state-dir", str(state_dir), "restore", "busy1", "--in-place", "--", *restore])
    out = capsys.readouterr().out
    assert code == 0, (images / "restore.log").read_text()[-2000:]
    try:
        assert data.read_text() == "original bytes\n"
        assert os.path.exists(f"/proc/{proc.pid}")
    finally:
        subprocess.run(["kill", "-9", str(proc.pid)], check=False)
    (kept,) = [p.name for p in (state_dir / "checkpoints").iterdir() if p.name.startswith("before-restore-")]
    assert f"the state it replaced is checkpoint {kept}" in out
    assert main(["--state-dir", str(state_dir), "list"]) == 0
    listed = capsys.readouterr().out
    assert kept in listed and "busy1" in listed
    assert main(["--state-dir", str(state_dir), "show", kept, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    aside = Path(shown["targets"][0]["image"])
    assert (aside / "data.txt").read_text() == "changed after the checkpoint, longer than before\n"
    assert shown["set_aside_by_restore_of"] == "busy1"
    # delete removes it like any image
    assert main(["--state-dir", str(state_dir), "delete", kept]) == 0
    assert not aside.exists() and not (state_dir / "checkpoints" / kept).exists()


def _spawn_with_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes]:
    """A process that gets ``pid`` (through ns_last_pid, as CRIU does), or a skip."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip(f"could not get pid {pid} for the test (other processes keep forking)")


def test_restore_right_after_a_dump_finds_its_pids_free_and_a_taken_pid_changes_nothing(
    criu_and_btrfs: tuple[Criu, Path], state_dir: Path, tmp_path: Path, pace: Pace, capsys: pytest.CaptureFixture[str]
) -> None:
    """A program whose parent is gone (PID 1 reaps it, slowly on some machines): the
    checkpoint returns only once the dumped tasks' PIDs are free, so that a restore
    at once works; and a PID taken meanwhile is reported before any rollback."""
    criu, mnt = criu_and_btrfs
    data = mnt / "data.txt"
    ready = tmp_path / "ready"
    pid = int(_start_orphan(HOLDER, str(data), str(ready), "keep", ready=ready, pace=pace, what="holder"))
    assert _stat_ppid(pid) != os.getpid()
    images = tmp_path / "images"
    images.mkdir()
    dump = [criu.path, "dump", "-t", str(pid), "-D", str(images), "--log-file", "dump.log"]
    try:
        assert main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(pid), "--id", "gone", "--", *dump]) == 0
        assert not os.path.exists(f"/proc/{pid}"), "checkpoint returned while the dumped task held its PID"
        manifest = json.loads((state_dir / "checkpoints" / "gone" / "manifest.json").read_text())
        assert "dumped_tasks_gone" in manifest["timings"] and manifest["tasks"]["pids"] == [pid]
        data.write_text("changed after the checkpoint, longer than before\n")
        restore = [criu.path, "restore", "-D", str(images), "-d", "--manage-cgroups=ignore", "--log-file", "r.log"]
        taker = _spawn_with_pid(pid, ["sleep", "600"])
        try:
            capsys.readouterr()
            code = main(["--state-dir", str(state_dir), "restore", "gone", "--in-place", "--", *restore])
            err = capsys.readouterr().err
            assert code == 1
            assert f"pid {pid} (sleep) holds one" in err and "nothing was changed" in err, err
            assert data.read_text() == "changed after the checkpoint, longer than before\n"
            assert not (images / "r.log").exists()
        finally:
            taker.kill()
            taker.wait()
        code = main(["--state-dir", str(state_dir), "restore", "gone", "--in-place", "--", *restore])
        assert code == 0, (images / "r.log").read_text()[-2000:]
        assert data.read_text() == "original bytes\n"
        assert os.path.exists(f"/proc/{pid}")
    finally:
        subprocess.run(["kill", "-9", str(pid)], check=False)


def _stat_ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


TCP_SERVER = """
import os, socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen()
port = srv.getsockname()[1]
cli = socket.create_connection(("127.0.0.1", port))
conn, _ = srv.accept()
log = open(sys.argv[1], "a")
os.chdir("/")
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {port}")
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
srv.settimeout(0.02)
i = 0
while True:
    i += 1
    cli.sendall(b"%d\\n" % i)
    log.write(conn.recv(64).decode())
    log.flush()
    try:
        c, _ = srv.accept()
        c.sendall(b"hello %d\\n" % i)
        c.close()
    except socket.timeout:
        pass
"""


def test_a_tcp_server_with_an_established_connection_is_checkpointed_and_restored(
    criu_and_btrfs: tuple[Criu, Path], state_dir: Path, tmp_path: Path, pace: Pace
) -> None:
    """CRIU >= 4.2 on this kernel (4.1 failed on any TCP or UDP socket): a server
    listening on 127.0.0.1 and talking to itself over an established connection,
    its log on the checkpointed btrfs, comes back and goes on counting from the
    checkpoint, and still accepts connections."""
    import socket

    criu, mnt = criu_and_btrfs
    if criu.version < (4, 2):
        pytest.fail(f"CRIU {criu.version_string} < 4.2: run scripts/setup-criu.sh")
    log, ready = mnt / "count.log", tmp_path / "ready"
    said = _start_orphan(TCP_SERVER, str(log), str(ready), ready=ready, pace=pace, what="server")
    pid, port = (int(x) for x in said.split())
    tcp = ["--tcp-established", "--network-lock", "nftables"]
    images = tmp_path / "images"
    images.mkdir()
    try:
        time.sleep(0.2)
        dump = [criu.path, "dump", "-t", str(pid), "-D", str(images), *tcp, "--log-file", "dump.log"]
        code = main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(pid), "--id", "tcp", "--", *dump])
        assert code == 0, (images / "dump.log").read_text()[-3000:]
        at_checkpoint = log.read_text().split()
        assert at_checkpoint and not os.path.exists(f"/proc/{pid}")
        log.write_text("damage after the checkpoint\n")
        restore = [criu.path, "restore", "-D", str(images), "-d", *tcp, "--log-file", "restore.log"]
        code = main(["--state-dir", str(state_dir), "restore", "tcp", "--in-place", "--", *restore])
        assert code == 0, (images / "restore.log").read_text()[-3000:]
        # back in the cgroups it lived in, not in the temporary one CRIU re-made
        assert "snapcore-" not in Path(f"/proc/{pid}/cgroup").read_text()
        assert not list(Path("/sys/fs/cgroup").glob("**/snapcore-tcp"))
        with socket.create_connection(("127.0.0.1", port), timeout=pace.seconds(5)) as s:
            assert s.recv(64).startswith(b"hello ")
        deadline = time.monotonic() + pace.seconds(10)
        while len(log.read_text().split()) < len(at_checkpoint) + 20:
            assert time.monotonic() < deadline, "the restored server does not count on"
            time.sleep(0.02)
        counted = [int(x) for x in log.read_text().split()]
        # the file as it was at the checkpoint, then the count going on: no gap, no repeat
        assert counted == list(range(1, len(counted) + 1))
        assert [str(x) for x in counted[: len(at_checkpoint)]] == at_checkpoint
    finally:
        subprocess.run(["kill", "-9", str(pid)], check=False)


LOCKER = """
import fcntl, os, sys, time
f = open(sys.argv[1], "w")
fcntl.flock(f, fcntl.LOCK_EX)
os.chdir(os.path.dirname(sys.argv[1]))
open(sys.argv[2] + ".tmp", "w").close(); os.rename(sys.argv[2] + ".tmp", sys.argv[2])
while True:
    time.sleep(0.05)
"""


def test_a_failed_criu_dump_says_what_criu_said(
    criu_and_btrfs: tuple[Criu, Path],
    state_dir: Path,
    tmp_path: Path,
    pace: Pace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A program holding a file lock needs --file-locks: the error says so in CRIU's
    words, not only 'exited with status 1'."""
    criu, mnt = criu_and_btrfs
    ready = tmp_path / "locked"
    proc = _start(LOCKER, str(mnt / "db.lock"), str(ready), ready=ready, pace=pace, what="locker")
    try:
        images = tmp_path / "images"
        images.mkdir()
        dump = [criu.path, "dump", "-t", str(proc.pid), "-D", str(images), "--log-file", "dump.log"]
        capsys.readouterr()
        code = main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "lk", "--", *dump])
        out, err = capsys.readouterr()
        assert code == 1
        assert "CRIU says:" in err and "--file-locks" in err, err
        # said once: on stderr, not again in the summary on stdout
        assert "checkpoint lk: failed" in out and "--file-locks" not in out and err.count("--file-locks") == 1
        assert f"(log: {images / 'dump.log'})" in err
        manifest = json.loads((state_dir / "checkpoints" / "lk" / "manifest.json").read_text())
        assert "--file-locks" in manifest["error"] and manifest["outcome"] == "failed"
        assert _state(proc) in "SR", "the task was not thawed"  # a failed dump leaves it running
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("on_change", [None, "delay"])
def test_criu_action_script(
    criu_and_btrfs: tuple[Criu, Path],
    state_dir: Path,
    holder: object,
    tmp_path: Path,
    pace: Pace,
    on_change: str | None,
) -> None:
    """``delay``: CRIU stopped the tasks before the hook runs; the open hold starts
    (and is handed to the guard) inside the hook."""
    criu, mnt = criu_and_btrfs
    data = mnt / "data.txt"
    proc = holder(data)  # type: ignore[operator]
    images = tmp_path / "criu-images"
    images.mkdir()
    # CRIU runs an action script by path, without a shell: the one snapcore writes
    hook = tmp_path / "snapcore-hook"
    policy: list[str] = []
    if on_change:
        (tmp_path / "p.yaml").write_text(f"version: 1\nmounts:\n  {mnt}:\n    on_change: {on_change}\n")
        policy = ["--policy", str(tmp_path / "p.yaml")]
    assert main(["--state-dir", str(state_dir), "criu-hook", *policy, "--write-script", str(hook)]) == 0
    assert os.stat(hook).st_mode & 0o777 == 0o755
    base = [criu.path, "--action-script", str(hook)]
    dump = subprocess.run(
        [*base[:3], "dump", "-t", str(proc.pid), "-D", str(images), "--log-file", "dump.log"], capture_output=True
    )
    assert dump.returncode == 0, (images / "dump.log").read_text()[-3000:]
    cid = (images / "snapcore-checkpoint").read_text().strip()
    manifest = json.loads((state_dir / "checkpoints" / cid / "manifest.json").read_text())
    assert manifest["outcome"] == "ok" and manifest["tasks"]["method"] == "stopped by CRIU"
    assert manifest["targets"][0]["consistency"] == "tasks-frozen" and manifest["tasks"]["stopped_ms"] > 0
    assert manifest["criu"]["images_dir"] == str(images)
    assert any(f["path"] == str(data) for f in manifest["files"])
    if on_change:
        assert manifest["holds"] == [] and "hold_start" in manifest["timings"], manifest["warnings"]
    proc.wait(pace.seconds(10))
    data.write_text("changed after the checkpoint, longer than before\n")
    restore = subprocess.run(
        [*base[:3], "restore", "-D", str(images), "-d", "--manage-cgroups=ignore", "--log-file", "restore.log"],
        capture_output=True,
    )
    assert restore.returncode == 0, (images / "restore.log").read_text()[-3000:]
    try:
        assert data.read_text() == "original bytes\n"
    finally:
        subprocess.run(["kill", "-9", str(proc.pid)], check=False)


@pytest.mark.parametrize("shell", ["exec", "child"])
def test_criu_running_the_action_script_twice_makes_one_checkpoint_and_one_restore(
    criu_and_btrfs: tuple[Criu, Path], state_dir: Path, holder: object, tmp_path: Path, pace: Pace, shell: str
) -> None:
    """CRIU 4.1 runs every action script twice under runc and podman (it reads their
    config file twice). CRIU 4.2 does the same for real when a script is named both in
    a config file and on the command line: one dump, two post-dump calls by one CRIU.
    ``child``: the script CRIU runs calls the hook without exec, so a shell that differs
    at every call stands between CRIU and the hook."""
    criu, mnt = criu_and_btrfs
    data = mnt / "data.txt"
    proc = holder(data)  # type: ignore[operator]
    images = tmp_path / "criu-images"
    images.mkdir()
    hook = tmp_path / "snapcore-hook"
    assert main(["--state-dir", str(state_dir), "criu-hook", "--write-script", str(hook)]) == 0
    if shell == "child":
        wrapper = tmp_path / "wrapper"
        wrapper.write_text(f"#!/bin/sh\n{hook}\nexit $?\n")
        wrapper.chmod(0o755)
        hook = wrapper
    config = tmp_path / "criu.conf"
    config.write_text(f"action-script {hook}\n")
    twice = [criu.path, "--config", str(config), "--action-script", str(hook)]
    dump = subprocess.run(
        [*twice, "dump", "-t", str(proc.pid), "-D", str(images), "--log-file", "dump.log"],
        capture_output=True,
        text=True,
    )
    log = (images / "dump.log").read_text()  # CRIU gives its scripts its log as stderr
    assert dump.returncode == 0, log[-3000:]
    assert log.count("of the dumped tasks' filesystems") == 1, log[-3000:]
    assert "was made at this dump's first post-dump call" in log, log[-3000:]
    made = sorted(p.name for p in (state_dir / "checkpoints").iterdir())
    assert len(made) == 1 and (images / "snapcore-checkpoint").read_text().strip() == made[0]
    proc.wait(pace.seconds(10))
    data.write_text("changed after the checkpoint\n")
    restore = subprocess.run(
        [*twice, "restore", "-D", str(images), "-d", "--manage-cgroups=ignore", "--log-file", "restore.log"],
        capture_output=True,
        text=True,
    )
    log = (images / "restore.log").read_text()
    assert restore.returncode == 0, log[-3000:]
    try:
        assert log.count("rolled back in place") == 1, log[-3000:]
        assert "was restored at this restore's first pre-restore call" in log, log[-3000:]
        assert data.read_text() == "original bytes\n"
    finally:
        subprocess.run(["kill", "-9", str(proc.pid)], check=False)


SCENARIO = """
import mmap, os, signal, sys, time
mode, path, ready, result = sys.argv[1:5]
content = b"the bytes the program had\\n" * 64
with open(path, "wb") as f:
    f.write(content)
if mode == "hardlink":
    os.link(path, path + ".link")
f = open(path + (".link" if mode == "hardlink" else ""), "rb")
m = None
if mode == "mapped-deleted":
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    f.close()
if mode in ("deleted", "mapped-deleted"):
    os.unlink(path)
elif mode == "renamed":
    os.rename(path, path + ".new")
elif mode == "renamed-over":
    with open(path + ".other", "wb") as g:
        g.write(b"another file\\n")
    os.rename(path + ".other", path)

def report(signum, frame):
    data = m[:] if m is not None else os.pread(f.fileno(), 1 << 20, 0)
    with open(result, "wb") as out:
        out.write(data)

signal.signal(signal.SIGUSR1, report)
with open(ready + ".tmp", "w") as r:  # appears whole: never caught open and empty
    r.write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
while True:
    time.sleep(0.05)
"""

CHANGES = {
    # what happens to the files between the checkpoint and the restore
    "present": lambda p: p.write_bytes(b"changed after the checkpoint\n"),
    "modified": lambda p: p.write_bytes(b"x" * 4096),
    "truncated": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.with_name(p.name + ".newcomer").write_bytes(b"unrelated\n"),
    "renamed": lambda p: p.with_name(p.name + ".new").write_bytes(b"overwritten\n"),
    "renamed-over": lambda p: p.write_bytes(b"yet another file\n"),
    "mapped-deleted": lambda p: p.with_name("other").write_bytes(b"unrelated\n"),
    "hardlink": lambda p: p.with_name(p.name + ".link").write_bytes(b"changed through the link\n"),
}


@pytest.mark.parametrize("mode", sorted(CHANGES))
def test_criu_restart_reads_the_bytes_it_had(
    mode: str, criu_and_btrfs: tuple[Criu, Path], state_dir: Path, tmp_path: Path, pace: Pace
) -> None:
    criu, mnt = criu_and_btrfs
    path = mnt / "data.bin"
    ready, result = tmp_path / "ready", tmp_path / "result"
    program_mode = "keep" if mode in ("present", "modified", "truncated") else mode
    args = (program_mode, str(path), str(ready), str(result))
    proc = _start(SCENARIO, *args, ready=ready, pace=pace, what="scenario program")
    try:
        images = tmp_path / "images"
        images.mkdir()
        dump = [criu.path, "dump", "-t", str(proc.pid), "-D", str(images), "--log-file", "dump.log"]
        code = main(["--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid), "--id", "s", "--", *dump])
        assert code == 0, (images / "dump.log").read_text()[-2000:]
        manifest = json.loads((state_dir / "checkpoints" / "s" / "manifest.json").read_text())
        states = {f["state"] for f in manifest["files"] if f["path"].startswith(str(mnt))}
        expected = {"deleted": "deleted", "mapped-deleted": "deleted", "renamed-over": "renamed-over"}
        assert expected.get(mode, "present") in states, manifest["files"]
        if mode in expected:  # only the program held these bytes: snapcore kept a ghost copy
            ghost = next(f["ghost"] for f in manifest["files"] if f["state"] == expected[mode])
            assert Path(ghost["path"]).read_bytes() == b"the bytes the program had\n" * 64
        proc.wait(pace.seconds(10))
        CHANGES[mode](path)
        restore = [criu.path, "restore", "-D", str(images), "-d", "--manage-cgroups=ignore"]
        code = main(
            ["--state-dir", str(state_dir), "restore", "s", "--in-place", "--", *restore, "--log-file", "r.log"]
        )
        assert code == 0, (images / "r.log").read_text()[-2000:]
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + pace.seconds(10)
        while not result.exists() or result.stat().st_size < 64:
            assert time.monotonic() < deadline, "the restarted program did not answer"
            time.sleep(0.02)
        assert result.read_bytes() == b"the bytes the program had\n" * 64
    finally:
        subprocess.run(["kill", "-9", str(proc.pid)], check=False, capture_output=True)
        proc.wait()


@pytest.mark.parametrize("uncovered", ["warn", "fail"])
def test_mounts_the_policy_does_not_cover(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, uncovered: str, pace: Pace
) -> None:
    covered, other = loop_fs("ext4"), loop_fs("ext4")
    # one task holding a file on each mount; the policy names only the first
    proc = subprocess.Popen(
        ["sh", "-c", f"exec 3>{covered.mount_point}/a.txt 4>{other.mount_point}/b.txt; exec sleep 60"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + pace.seconds(10)
        while len(os.listdir(f"/proc/{proc.pid}/fd")) < 5 or not (other.mount_point / "b.txt").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(pace.seconds(0.05))  # the exec into sleep keeps fds 3 and 4
        policy = tmp_path / "p.yaml"
        policy.write_text(
            f"version: 1\nuncovered: {uncovered}\nmounts:\n  {covered.mount_point}: {{imager: fsfreeze}}\n"
        )
        argv = ["--state-dir", str(state_dir), "checkpoint", "--policy", str(policy), "--pid", str(proc.pid)]
        code = main([*argv, "--id", f"u-{uncovered}"])
        if uncovered == "fail":
            assert code == 2
        else:
            assert code == 0
            manifest = json.loads((state_dir / "checkpoints" / "u-warn" / "manifest.json").read_text())
            assert [t["mount"] for t in manifest["targets"]] == [str(covered.mount_point)]
            assert any(str(other.mount_point) in w and "not covered" in w for w in manifest["warnings"])
    finally:
        proc.kill()
        proc.wait()


def test_tasks_are_thawed_by_the_guard_when_the_controller_dies(
    loop_fs: LoopFactory, state_dir: Path, holder: object, pace: Pace
) -> None:
    fs = loop_fs("ext4")
    proc = holder(fs.mount_point / "data.txt")  # type: ignore[operator]
    env = dict(os.environ, SNAPCORE_FAULT="payload=kill")
    argv = [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "checkpoint", "--pid", str(proc.pid)]
    result = subprocess.run([*argv, "--id", "k", "--", "true"], env=env, capture_output=True, timeout=pace.seconds(60))
    assert result.returncode == -9  # killed with the tasks frozen and the filesystem imaged
    # the guard wrote cgroup.freeze = 0: the task runs again without anyone's help
    deadline = time.monotonic() + pace.seconds(5)
    while "frozen 0" not in _cgroup_events(proc.pid):
        assert time.monotonic() < deadline, "the tasks stayed frozen after the controller died"
        time.sleep(0.02)
    assert_not_frozen(fs.mount_point)
    # recover moves them back out of the temporary cgroup and marks the checkpoint failed
    assert main(["--state-dir", str(state_dir), "recover"]) == 0
    assert "snapcore-k" not in Path(f"/proc/{proc.pid}/cgroup").read_text()
    manifest = json.loads((state_dir / "checkpoints" / "k" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed"


def _cgroup_events(pid: int) -> str:
    from snapcore.tasks.cgroups import cgroup_hierarchies, task_cgroup

    v2, _ = cgroup_hierarchies()
    assert v2 is not None
    group = task_cgroup(pid, 2)
    directory = v2.dir_of(group or "/")
    assert directory is not None
    return Path(directory, "cgroup.events").read_text()
