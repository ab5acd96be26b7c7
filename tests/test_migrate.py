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

import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapcore.tasks.criu import Criu
from snapcore.testing import Pace
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
