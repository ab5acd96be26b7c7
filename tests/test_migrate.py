"""A checkpointed program moved to another node and restarted there, on one machine:
two nodes (network + mount namespaces, each its own ext4 at /srv/app, joined by a
veth pair; :mod:`snapcore.testing.nodes`), an rsync daemon on B's address as the
transport, CRIU to dump and restore.

On A: ``snapcore checkpoint --pid P`` (fsfreeze + rsync to B's daemon, the export
in B's module) with ``criu dump`` as its payload; the CRIU images follow by rsync to
B's daemon too. On B: ``snapcore restore --from EXPORT --to /srv/app -- criu
restore``: the files land at the same path on B's own filesystem, are checked
against the checkpoint's inventory, and CRIU starts the program there. It goes on
with the bytes it had: the counter continues on B, the file it held open after
deleting it is intact, and A's filesystem is untouched by B.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from snapcore.tasks.criu import Criu
from snapcore.testing import Pace
from snapcore.testing.containers import BUSYBOX, busybox_rootfs, read_count, runc_bundle, wait_for_count
from snapcore.testing.nodes import APP, Node, NodeProcess, Nodes, rsync_daemon

pytest_plugins = ["snapcore.testing.nodes"]

# stdio opened inside the node: a descriptor of the host's /dev/null is on a mount
# the node's namespace does not have, which CRIU cannot dump
PROGRAM = (
    "exec </dev/null >/dev/null 2>&1; "
    f"echo 'held while deleted' > {APP}/deleted; exec 3<{APP}/deleted; rm {APP}/deleted; "
    f"i=0; while :; do i=$((i+1)); echo $i > {APP}/count; sleep 0.05; done"
)


def test_a_program_moves_to_another_node_and_goes_on(
    two_nodes: Nodes, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch, criu: Criu
) -> None:
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    a, b = two_nodes.a, two_nodes.b
    exports, images_b = tmp_path / "exports-on-B", tmp_path / "images-on-B"
    exports.mkdir()
    images_b.mkdir()
    daemon = rsync_daemon(b, {"exports": exports, "images": images_b}, tmp_path)
    try:
        program = _start_counter(a, pace)
        pid = program.node_pid
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            f"version: 1\nmounts:\n  {APP}:\n    imager: fsfreeze\n    exporter: rsync\n"
            f"    options:\n      rsync:\n        dest: rsync://{b.address}:8730/exports\n"
        )
        images_a = tmp_path / "images-on-A"
        images_a.mkdir()
        snapcore = [sys.executable, "-m", "snapcore"]
        dumped = a.run(
            *snapcore, "--state-dir", str(tmp_path / "state-A"), "checkpoint", "--policy", str(policy),
            "--pid", str(pid), "--id", "move1", "--",
            criu.path, "dump", "-t", str(pid), "-D", str(images_a), "-o", "dump.log",
            check=False,
        )  # fmt: skip
        assert dumped.returncode == 0, dumped.stdout + dumped.stderr
        program.wait(timeout=pace.seconds(30))  # CRIU ended it: reaped, its PID is free for the restore
        at_checkpoint = int(a.run("cat", f"{APP}/count").stdout)
        a.run("rsync", "-a", f"{images_a}/", f"rsync://{b.address}:8730/images/")

        restored = b.run(
            *snapcore, "--state-dir", str(tmp_path / "state-B"), "restore", "--from", str(exports / "move1"),
            "--to", APP, "--", criu.path, "restore", "-D", str(images_b), "-d", "-o", "restore.log",
            "--manage-cgroups=ignore",  # not into A's temporary cgroup (see Move.restore_on_b)
            check=False,
        )  # fmt: skip
        assert restored.returncode == 0, restored.stdout + restored.stderr
        assert "the files the tasks need are as they had them" in restored.stdout
        deadline = time.monotonic() + pace.seconds(30)
        while True:
            now = b.run("cat", f"{APP}/count", check=False).stdout.strip()
            if now.isdigit() and int(now) > at_checkpoint:
                break
            assert time.monotonic() < deadline, f"the program did not go on on B ({now!r} after {at_checkpoint})"
            time.sleep(0.05)
        assert int(now) < at_checkpoint + 200  # it went on from there, not from 0
        held = b.run("cat", f"/proc/{pid}/fd/3").stdout
        assert held == "held while deleted\n"
        # A's filesystem stays as the checkpoint left it: B writes to its own
        assert int(a.run("cat", f"{APP}/count").stdout) == at_checkpoint
    finally:
        daemon.kill()
        daemon.wait()


def _start_counter(node: Node, pace: Pace) -> NodeProcess:
    """The counter program on ``node`` (its PID there: ``node_pid``)."""
    program = node.start("sh", "-c", PROGRAM)
    deadline = time.monotonic() + pace.seconds(30)
    while node.run("cat", f"{APP}/count", check=False).stdout.strip() in ("", "0", "1", "2"):
        assert time.monotonic() < deadline and program.poll() is None, f"the program did not start on {node.name}"
        time.sleep(0.05)
    return program


def _still_running_and_writable(node: Node, pace: Pace) -> None:
    """The program goes on counting on ``node`` and its filesystem takes a write."""
    before = int(node.run("cat", f"{APP}/count").stdout)
    deadline = time.monotonic() + pace.seconds(30)
    while int(node.run("cat", f"{APP}/count").stdout or 0) <= before:
        assert time.monotonic() < deadline, f"the program stopped on {node.name}"
        time.sleep(0.05)
    node.run("sh", "-c", f"echo probe > {APP}/probe", timeout=pace.seconds(10))


@pytest.mark.parametrize("failure", ["daemon-killed", "destination-full"])
def test_a_move_that_fails_on_the_way_leaves_the_program_on_A(
    two_nodes: Nodes, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch, criu: Criu, failure: str
) -> None:
    """The transport breaks while the export is copied inside the freeze window (B's
    rsync daemon killed), or B's filesystem is full: the checkpoint fails (exit 1, its
    manifest says why), A is thawed and the program runs on there, CRIU never dumped
    it, and nothing on B is presented as a checkpoint (``restore --from`` refuses)."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    a, b = two_nodes.a, two_nodes.b
    exports = "/srv/exports"
    two_nodes.add_fs(b, exports, 32 if failure == "destination-full" else 512)
    daemon = rsync_daemon(b, {"exports": Path(exports)}, tmp_path)
    program: subprocess.Popen[bytes] | None = None
    try:
        program = _start_counter(a, pace)
        pid = program.node_pid
        a.run("sh", "-c", f"mkdir {APP}/bulk && for i in $(seq 48); do head -c 2M /dev/urandom > {APP}/bulk/f$i; done")
        policy = tmp_path / "policy.yaml"
        policy.write_text(
            f"version: 1\nmounts:\n  {APP}:\n    imager: fsfreeze\n    exporter: rsync\n    freeze_timeout: 10m\n"
            f"    options:\n      rsync:\n        dest: rsync://{b.address}:8730/exports\n        timeout: 5s\n"
        )
        images = tmp_path / "images-on-A"
        images.mkdir()
        argv = [sys.executable, "-m", "snapcore", "--state-dir", str(tmp_path / "state-A"), "checkpoint"]
        argv += ["--policy", str(policy), "--pid", str(pid), "--id", "move2", "--"]
        argv += [criu.path, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log"]
        checkpoint = subprocess.Popen(a.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if failure == "daemon-killed":
            deadline = time.monotonic() + pace.seconds(60)
            while b.run("sh", "-c", f"ls -A {exports}/move2 2>/dev/null", check=False).stdout.strip() == "":
                assert time.monotonic() < deadline and checkpoint.poll() is None, "the export never started"
                time.sleep(0.02)
            daemon.kill()
        out, err = checkpoint.communicate(timeout=pace.seconds(300))
        assert checkpoint.returncode == 1 and "Traceback" not in err, out + err
        assert "rsync" in err, err
        assert not (images / "inventory.img").exists()  # CRIU never ran
        _still_running_and_writable(a, pace)
        shown = a.run(sys.executable, "-m", "snapcore", "--state-dir", str(tmp_path / "state-A"), "show", "move2")
        assert "failed" in shown.stdout
        refused = b.run(
            sys.executable, "-m", "snapcore", "--state-dir", str(tmp_path / "state-B"), "restore",
            "--from", f"{exports}/move2", "--to", APP, check=False,
        )  # fmt: skip
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        assert b.run("ls", "-A", APP).stdout.strip() == ""  # nothing put in place on B
    finally:
        for process in (daemon, program):
            if process is not None:
                process.kill()
                process.wait()


# -- one command on each side: the images travel with the export, A holds the program
# until B says it runs there ---------------------------------------------------------------

#: The seed's scenarios, in one program: a file held open after it was deleted, one
#: renamed while open, one renamed over (the old inode held), one mapped and deleted;
#: and a counter. stdio is reopened inside the node (see PROGRAM).
SCENARIOS = f"""
import mmap, os, time
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
os.close(null)
A = "{APP}"
def write(name, text):
    with open(f"{{A}}/{{name}}", "w") as f:
        f.write(text)
write("deleted", "held while deleted\\n")
deleted = open(f"{{A}}/deleted")                 # fd 3
os.unlink(f"{{A}}/deleted")
write("old", "renamed while open\\n")
renamed = open(f"{{A}}/old")                     # fd 4
os.rename(f"{{A}}/old", f"{{A}}/new")
write("keep", "the old content\\n")
kept = open(f"{{A}}/keep")                       # fd 5
write("keep.new", "the new content\\n")
os.rename(f"{{A}}/keep.new", f"{{A}}/keep")
write("mapped", "mapped while deleted\\n" * 100)
with open(f"{{A}}/mapped", "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
os.unlink(f"{{A}}/mapped")
i = 0
while True:
    i += 1
    write("count.new", f"{{i}}\\n")
    os.rename(f"{{A}}/count.new", f"{{A}}/count")
    time.sleep(0.05)
"""


def _start_scenarios(node: Node, pace: Pace) -> NodeProcess:
    program = node.start(sys.executable, "-c", SCENARIOS)
    deadline = time.monotonic() + pace.seconds(30)
    while node.run("cat", f"{APP}/count", check=False).stdout.strip() in ("", "1", "2"):
        assert time.monotonic() < deadline and program.poll() is None, f"the program did not start on {node.name}"
        time.sleep(0.05)
    return program


def _mapped_content(node: Node, pid: int) -> str:
    """What the task maps of the deleted file ``mapped``, read through map_files."""
    maps = node.run("cat", f"/proc/{pid}/maps").stdout
    line = next(m for m in maps.splitlines() if m.endswith(f"{APP}/mapped (deleted)"))
    return node.run("cat", f"/proc/{pid}/map_files/{line.split()[0]}").stdout


def _count(node: Node) -> int:
    text = node.run("cat", f"{APP}/count", check=False).stdout.strip()
    return int(text) if text.isdigit() else -1


class Move:
    """``snapcore checkpoint --hand-off`` on A (in the background) and ``restore --from
    --wait`` on B, through B's rsync daemon: one command on each side."""

    def __init__(self, nodes: Nodes, tmp_path: Path, pace: Pace, criu: Criu, checkpoint_id: str) -> None:
        self.a, self.b, self.tmp, self.pace, self.criu, self.id = nodes.a, nodes.b, tmp_path, pace, criu, checkpoint_id
        self.exports = tmp_path / "exports-on-B"
        self.exports.mkdir()
        self.daemon = rsync_daemon(self.b, {"exports": self.exports}, tmp_path)
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(
            f"version: 1\nmounts:\n  {APP}:\n    imager: fsfreeze\n    exporter: rsync\n"
            f"    options:\n      rsync:\n        dest: rsync://{self.b.address}:8730/exports\n"
        )
        self.snapcore = [sys.executable, "-m", "snapcore"]
        #: A's state and run directories (the journal: not the host's /run/snapcore)
        self.on_a = ["--state-dir", str(tmp_path / "state-A"), "--run-dir", str(tmp_path / "run-A")]

    def start_on_a(self, pid: int, hand_off: float) -> subprocess.Popen[str]:
        images = self.tmp / "images-on-A"
        images.mkdir()
        argv = [*self.snapcore, *self.on_a, "checkpoint", "--policy", str(self.policy)]
        argv += ["--pid", str(pid), "--id", self.id, "--hand-off", f"{hand_off:.1f}s", "--"]
        argv += [self.criu.path, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log"]
        return subprocess.Popen(self.a.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def restore_on_b(self, *criu_options: str, wait: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [*self.snapcore, "--state-dir", str(self.tmp / "state-B"), "restore", "--from", str(self.export_dir)]
        argv += ["--wait", f"{self.pace.seconds(wait):.1f}s", "--to", APP, "--"]
        # the nodes share the host's cgroup hierarchy: CRIU would put the restored tasks
        # back into the cgroup they were dumped from, snapcore's temporary one on A,
        # frozen while A holds them (separate machines have hierarchies of their own)
        argv += [self.criu.path, "restore", "-d", "--manage-cgroups=ignore", "-o", str(self.tmp / "restore.log")]
        argv += criu_options
        return self.b.run(*argv, check=False, timeout=self.pace.seconds(300))

    @property
    def export_dir(self) -> Path:
        return self.exports / self.id

    def manifest_on_a(self) -> dict[str, Any]:
        path = self.tmp / "state-A" / "checkpoints" / self.id / "manifest.json"
        manifest: dict[str, Any] = json.loads(self.a.run("cat", str(path)).stdout)
        return manifest

    def recover_on_a(self) -> str:
        """``snapcore recover`` on A once its killed controller is gone (reaped by the
        node's init: until then its journal counts as alive and is left alone)."""
        deadline = time.monotonic() + self.pace.seconds(30)
        while "nothing to recover" in (recovered := self.a.run(*self.snapcore, *self.on_a, "recover").stdout):
            assert time.monotonic() < deadline, "recover never found the dead controller's journal"
            time.sleep(0.1)
        return recovered

    def close(self) -> None:
        self.daemon.kill()
        self.daemon.wait()


def test_a_program_moves_with_one_command_on_each_side(
    two_nodes: Nodes, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch, criu: Criu
) -> None:
    """A: ``checkpoint --pid P --hand-off T -- criu dump`` sends the files and CRIU's
    images (with ``--leave-running``: the tasks stay, frozen) and holds them; B:
    ``restore --from EXPORT --wait T --to /srv/app -- criu restore`` (no ``-D``: the
    images the export carries) restores, checks, starts the program and answers; A
    then ends its copy. On B the program goes on with the bytes it had, for each of
    the seed's scenarios; on A it is gone, and A's files are as it left them."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    move = Move(two_nodes, tmp_path, pace, criu, "move3")
    try:
        program = _start_scenarios(move.a, pace)
        pid = program.node_pid
        on_a = move.start_on_a(pid, pace.seconds(120))
        restored = move.restore_on_b()
        out, err = on_a.communicate(timeout=pace.seconds(120))
        assert restored.returncode == 0, restored.stdout + restored.stderr + err
        assert "the files the tasks need are as they had them" in restored.stdout
        assert f"restore -D {move.export_dir}/criu" in restored.stdout
        assert "told the source" in restored.stdout
        assert on_a.returncode == 0, out + err
        assert "the destination restored the program" in out, out
        manifest = move.manifest_on_a()
        assert manifest["handoff"]["state"] == "moved" and manifest["handoff"]["answer"]["outcome"] == "restored"
        assert "--leave-running" in manifest["criu"]["argv"]
        assert [s["parts"] for s in manifest["criu"]["sent"]] == [["criu", "ghosts"]]
        states = {f["path"]: f["state"] for f in manifest["files"]}
        # renamed before the checkpoint: the tasks hold it under its new name
        assert states[f"{APP}/deleted"] == "deleted" and states[f"{APP}/new"] == "present"
        assert states[f"{APP}/keep"] == "renamed-over" and states[f"{APP}/mapped"] == "deleted"
        program.wait(timeout=pace.seconds(30))  # ended on A once B had it
        at_checkpoint = _count(move.a)

        deadline = time.monotonic() + pace.seconds(30)
        while _count(move.b) <= at_checkpoint:
            assert time.monotonic() < deadline, f"the program did not go on on B ({_count(move.b)})"
            time.sleep(0.05)
        assert _count(move.b) < at_checkpoint + 200  # it went on from there, not from 0
        b = move.b
        assert b.run("cat", f"/proc/{pid}/fd/3").stdout == "held while deleted\n"
        assert b.run("cat", f"/proc/{pid}/fd/4").stdout == "renamed while open\n"
        assert b.run("cat", f"{APP}/new").stdout == "renamed while open\n"
        assert b.run("ls", f"{APP}/old", check=False).returncode != 0
        assert b.run("cat", f"/proc/{pid}/fd/5").stdout == "the old content\n"
        assert b.run("cat", f"{APP}/keep").stdout == "the new content\n"
        assert _mapped_content(b, pid) == "mapped while deleted\n" * 100
        assert _count(move.a) == at_checkpoint  # A's filesystem stays as the checkpoint left it
    finally:
        move.close()


@pytest.mark.parametrize("failure", ["check-fails", "criu-restore-fails", "no-answer", "source-killed"])
def test_a_move_that_fails_leaves_the_program_running_on_A(
    two_nodes: Nodes, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch, criu: Criu, failure: str
) -> None:
    """The move fails after A dumped the program and sent everything, while A holds it
    frozen: B's check finds a file altered on B before the restore (its copy in the
    export, same size, other bytes); B's ``criu restore`` fails (a real CRIU failure:
    its action script refuses pre-restore); B never answers (A's deadline); A's
    snapcore is SIGKILLed while it waits (the guard). In every case the program runs
    on on A, counting, its filesystem writable; B answers what failed (or nothing)."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    move = Move(two_nodes, tmp_path, pace, criu, "move4")
    program: NodeProcess | None = None
    try:
        program = _start_scenarios(move.a, pace)
        pid = program.node_pid
        hand_off = pace.seconds(3) if failure == "no-answer" else pace.seconds(120)
        on_a = move.start_on_a(pid, hand_off)
        deadline = time.monotonic() + pace.seconds(120)
        while not (move.export_dir / "manifest.json").exists():  # complete: A now waits
            assert time.monotonic() < deadline and on_a.poll() is None, "the export never completed"
            time.sleep(0.02)
        held = _count(move.a)
        time.sleep(0.3)
        assert _count(move.a) == held  # A holds the program frozen while it waits
        restored = None
        if failure == "check-fails":
            altered = move.export_dir / "srv-app" / "new"
            altered.write_text("renamed while OPEN\n")  # same size, other bytes
            restored = move.restore_on_b()
            assert "new" in restored.stderr and "differ" in restored.stderr, restored.stderr
        elif failure == "criu-restore-fails":
            restored = move.restore_on_b("--action-script", "/bin/false")
        elif failure == "source-killed":
            # the snapcore inside the node, then the nsenter that started it
            controllers = move.a.run("pgrep", "-f", "snapcore.*--hand-off").stdout.split()
            assert controllers
            move.a.run("kill", "-KILL", *controllers)
            os.kill(on_a.pid, signal.SIGKILL)
        out, err = on_a.communicate(timeout=pace.seconds(300))
        if restored is not None:
            assert restored.returncode == 1 and "Traceback" not in restored.stderr, restored.stdout + restored.stderr
            assert "told the source (the program goes on there)" in restored.stdout, restored.stdout
            answer = json.loads((move.export_dir / "handoff.json").read_text())
            assert answer["outcome"] == "failed" and answer["reason"], answer
        if failure != "source-killed":
            assert on_a.returncode == 1 and "Traceback" not in err, out + err
            assert "the program was not moved" in err and "it runs on here" in err, err
            handoff = move.manifest_on_a()["handoff"]
            assert handoff["state"] == "kept", handoff
        _still_running_and_writable(move.a, pace)
        assert program.poll() is None
        if failure == "source-killed":  # what an admin runs: the checkpoint stays, its hand-off says kept
            recovered = move.recover_on_a()
            assert "the controller died during the hand-off" in recovered, recovered
            assert "checkpoint move4: complete, kept" in recovered, recovered
            manifest = move.manifest_on_a()
            assert manifest["outcome"] == "ok" and manifest["handoff"]["state"] == "kept", manifest["handoff"]
            assert (move.export_dir / "criu").is_dir()  # the export is complete and kept
            assert not list(Path("/sys/fs/cgroup").glob("*/snapcore-move4")), "the temporary cgroup stayed"
    finally:
        if program is not None:
            program.kill()
            program.wait()
        move.close()


@pytest.mark.parametrize("on_b", ["same-content", "other-content"])
def test_the_destination_s_own_files_are_checked_by_content(
    two_nodes: Nodes, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch, criu: Criu, on_b: str
) -> None:
    """The program holds a file on a mount the checkpoint does not image (each node's
    own ``/srv/lib``: a "similar" node's library, say). B has its own copy: with the
    same bytes (another mtime: B's own) the move goes on; with the same size but other
    bytes, B's check refuses, names the file, and the program runs on on A."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    move = Move(two_nodes, tmp_path, pace, criu, "lib1")
    library = "/srv/lib/shared.so"
    move.a.run("sh", "-c", f"mkdir /srv/lib && echo 'the library A has' > {library}")
    time.sleep(0.01)  # B's copy is written later: another mtime
    content = "the library A has" if on_b == "same-content" else "the library B has"
    move.b.run("sh", "-c", f"mkdir /srv/lib && echo '{content}' > {library}")
    program: NodeProcess | None = None
    try:
        program = move.a.start("sh", "-c", f"exec 5<{library}; {PROGRAM}")
        deadline = time.monotonic() + pace.seconds(30)
        while _count(move.a) < 3:
            assert time.monotonic() < deadline and program.poll() is None, "the program did not start on A"
            time.sleep(0.05)
        on_a = move.start_on_a(program.node_pid, pace.seconds(120))
        restored = move.restore_on_b()
        out, err = on_a.communicate(timeout=pace.seconds(120))
        manifest = move.manifest_on_a()
        [held] = [f for f in manifest["files"] if f["path"] == library]
        assert held["sha256"], held  # digested although its mount is not imaged: a move
        if on_b == "same-content":
            assert restored.returncode == 0, restored.stdout + restored.stderr
            assert on_a.returncode == 0 and manifest["handoff"]["state"] == "moved", out + err
            program.wait(timeout=pace.seconds(30))
        else:
            assert restored.returncode == 1, restored.stdout + restored.stderr
            assert f"{library}: other content than the checkpoint's" in restored.stderr, restored.stderr
            assert on_a.returncode == 1 and manifest["handoff"]["state"] == "kept", out + err
            _still_running_and_writable(move.a, pace)
    finally:
        if program is not None and program.poll() is None:
            program.kill()
            program.wait()
        move.close()


# -- a runc container -------------------------------------------------------------------

#: The container's program (busybox sh): a file held open after it is deleted (fd 3),
#: a file renamed over while held (fd 4: the old inode), the counter in /data/count.
CONTAINER_PROGRAM = (
    "exec </dev/null >/dev/null 2>&1; "
    "echo 'held while deleted' > /data/deleted; exec 3</data/deleted; rm /data/deleted; "
    "echo 'the old content' > /data/keep; exec 4</data/keep; "
    "echo 'the new content' > /data/keep.new; mv /data/keep.new /data/keep; "
    "i=0; while :; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"
)
ROOTFS = f"{APP}/rootfs"


class ContainerMove(Move):
    """A runc container on A's ``/srv/app/rootfs``; each node its own runc state
    directory, bundle and container id (the nodes share the host's cgroup hierarchy:
    B's container needs a cgroup of its own while A's still holds its tasks)."""

    def __init__(self, nodes: Nodes, tmp_path: Path, pace: Pace, criu: Criu, checkpoint_id: str) -> None:
        if shutil.which("runc") is None:
            pytest.skip("runc is missing: apt-get install --no-install-recommends runc (make setup does)")
        if not os.path.exists(BUSYBOX):
            pytest.skip("busybox is missing: apt-get install busybox-static")
        super().__init__(nodes, tmp_path, pace, criu, checkpoint_id)
        self.ids = {"A": f"{checkpoint_id}-{os.getpid()}-a", "B": f"{checkpoint_id}-{os.getpid()}-b"}
        for name in ("A", "B"):
            runc_bundle(tmp_path / f"bundle-{name}", ROOTFS, CONTAINER_PROGRAM)
        busybox_rootfs(self.on(self.a, ROOTFS), applets=("sh", "sleep", "cat", "echo", "rm", "mv"))

    @staticmethod
    def on(node: Node, path: str) -> Path:
        """``path`` of ``node``'s mount namespace, as the host reaches it."""
        return Path(f"/proc/{node.init}/root{path}")

    def runc(self, node: Node, *args: str) -> list[str]:
        return ["runc", "--root", str(self.tmp / f"runc-{node.name}"), "--criu", self.criu.path, *args]

    def state(self, node: Node) -> dict[str, Any]:
        done = node.run(*self.runc(node, "state", self.ids[node.name]), check=False)
        return json.loads(done.stdout) if done.returncode == 0 else {"status": "gone"}

    def start(self) -> int:
        """The container running on A; its counter's value."""
        self.a.run(*self.runc(self.a, "run", "-d", "--bundle", str(self.tmp / "bundle-A"), self.ids["A"]))
        return wait_for_count(self.on(self.a, f"{ROOTFS}/data/count"), 2, self.pace.seconds(30))

    def start_on_a(self, pid: int, hand_off: float) -> subprocess.Popen[str]:
        del pid  # the runtime names the container's tasks
        argv = [*self.snapcore, *self.on_a, "checkpoint", "--policy", str(self.policy), "--id", self.id]
        argv += ["--hand-off", f"{hand_off:.1f}s", "--container", f"runc:{self.ids['A']}", "--"]
        argv += self.runc(self.a, "checkpoint", "--image-path", str(self.tmp / "images-on-A"))
        argv += ["--work-path", str(self.tmp / "work-A"), self.ids["A"]]
        return subprocess.Popen(self.a.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def restore_on_b(self, *options: str, wait: float = 60) -> subprocess.CompletedProcess[str]:
        argv = [*self.snapcore, "--state-dir", str(self.tmp / "state-B"), "restore", "--from", str(self.export_dir)]
        argv += ["--wait", f"{self.pace.seconds(wait):.1f}s", "--to", APP, "--"]
        argv += self.runc(self.b, "restore", "-d", "--bundle", str(self.tmp / "bundle-B"), *options)
        argv += ["--work-path", str(self.tmp / "work-B"), self.ids["B"]]
        return self.b.run(*argv, check=False, timeout=self.pace.seconds(300))

    def close(self) -> None:
        for node in (self.a, self.b):
            node.run(*self.runc(node, "delete", "-f", self.ids[node.name]), check=False)
        super().close()


def test_a_runc_container_moves_with_one_command_on_each_side(
    two_nodes: Nodes, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch, criu: Criu
) -> None:
    """A: ``snapcore checkpoint --container runc:ID --hand-off T -- runc checkpoint``:
    runc's CRIU holds the container stopped at post-dump while snapcore images and
    sends its files and CRIU's images and waits; B: ``snapcore restore --from EXPORT
    --wait T --to /srv/app -- runc restore`` (no ``--image-path``: the export's)
    restores, checks and starts it, and answers; A's CRIU then ends its copy. The
    container goes on on B with the bytes it had."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    move = ContainerMove(two_nodes, tmp_path, pace, criu, "ctr1")
    try:
        move.start()
        on_a = move.start_on_a(0, pace.seconds(120))
        restored = move.restore_on_b()
        out, err = on_a.communicate(timeout=pace.seconds(120))
        assert restored.returncode == 0, restored.stdout + restored.stderr + err
        assert f"restore --image-path {move.export_dir}/criu" in restored.stdout
        assert "the files the tasks need are as they had them" in restored.stdout
        assert "told the source" in restored.stdout
        assert on_a.returncode == 0, out + err
        manifest = move.manifest_on_a()
        assert manifest["handoff"]["state"] == "moved", manifest["handoff"]
        assert manifest["tasks"]["container"] == f"runc:{move.ids['A']}"
        # runc hands CRIU the directory as a descriptor: the manifest names the directory
        assert manifest["criu"]["images_dir"] == str(tmp_path / "images-on-A")
        states = {f["path"]: f["state"] for f in manifest["files"]}
        assert states["/data/deleted"] == "deleted" and states["/data/keep"] == "renamed-over", states
        assert move.state(move.a)["status"] == "gone"  # ended by its CRIU, removed by runc

        at_checkpoint = read_count(move.on(move.a, f"{ROOTFS}/data/count"))
        assert at_checkpoint is not None
        on_b = wait_for_count(move.on(move.b, f"{ROOTFS}/data/count"), at_checkpoint, pace.seconds(30))
        assert on_b < at_checkpoint + 200  # it went on from there, not from 0
        state = move.state(move.b)
        assert state["status"] == "running", state
        pid = state["pid"]
        assert move.b.run("cat", f"/proc/{pid}/fd/3").stdout == "held while deleted\n"
        assert move.b.run("cat", f"/proc/{pid}/fd/4").stdout == "the old content\n"
        assert move.b.run("cat", f"{ROOTFS}/data/keep").stdout == "the new content\n"
        assert read_count(move.on(move.a, f"{ROOTFS}/data/count")) == at_checkpoint  # A's files as they were
    finally:
        move.close()


@pytest.mark.parametrize("failure", ["no-answer", "restore-fails", "source-killed"])
def test_a_container_move_that_fails_leaves_it_running_on_A(
    two_nodes: Nodes, tmp_path: Path, pace: Pace, monkeypatch: pytest.MonkeyPatch, criu: Criu, failure: str
) -> None:
    """B never answers (A's deadline); B's ``runc restore`` fails for real (a bundle
    that is not there) and B answers so; A's snapcore is SIGKILLed while it waits (the
    relay's pipe closes, the action fails). In every case A's CRIU resumes the
    container, which goes on counting there; the checkpoint is complete and kept."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    move = ContainerMove(two_nodes, tmp_path, pace, criu, "ctr2")
    try:
        move.start()
        on_a = move.start_on_a(0, pace.seconds(3) if failure == "no-answer" else pace.seconds(120))
        deadline = time.monotonic() + pace.seconds(120)
        while not (move.export_dir / "manifest.json").exists():  # complete: A now waits
            assert time.monotonic() < deadline and on_a.poll() is None, "the export never completed"
            time.sleep(0.02)
        if failure == "restore-fails":
            restored = move.restore_on_b("--bundle", str(tmp_path / "no-such-bundle"))
            assert restored.returncode != 0 and "Traceback" not in restored.stderr, restored.stdout + restored.stderr
            assert "told the source (the program goes on there)" in restored.stdout, restored.stdout
        elif failure == "source-killed":
            controllers = move.a.run("pgrep", "-f", "snapcore.*--hand-off").stdout.split()
            assert controllers
            move.a.run("kill", "-KILL", *controllers)
        out, err = on_a.communicate(timeout=pace.seconds(120))
        assert on_a.returncode != 0 and "Traceback" not in err, out + err
        if failure != "source-killed":
            assert on_a.returncode == 1, out + err
            assert "the container was not moved" in err and "it runs on here" in err, err
            manifest = move.manifest_on_a()
            assert manifest["outcome"] == "ok" and manifest["handoff"]["state"] == "kept", manifest["handoff"]
        assert (move.export_dir / "criu").is_dir() and (move.export_dir / "manifest.json").is_file()
        assert move.state(move.a)["status"] == "running"
        count = move.on(move.a, f"{ROOTFS}/data/count")
        now = read_count(count)
        assert now is not None
        wait_for_count(count, now, pace.seconds(30))
        move.a.run("sh", "-c", f"echo probe > {ROOTFS}/probe", timeout=pace.seconds(10))  # not frozen
        if failure == "source-killed":  # what an admin runs: the checkpoint stays, its hand-off says kept
            recovered = move.recover_on_a()
            assert "checkpoint ctr2: complete, kept" in recovered, recovered
            assert move.manifest_on_a()["handoff"]["state"] == "kept"
    finally:
        move.close()
