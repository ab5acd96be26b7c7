"""runc checkpoint and restore with snapcore, driven the way runc's users drive it:
``runc checkpoint``/``runc restore`` with CRIU's action script named in the config
file of the OCI annotation ``org.criu.config``. The container is a busybox rootfs on
a btrfs subvolume mounted on its own, built here; nothing is pulled.

The container keeps a counter in ``/data/count`` and holds ``/data/deleted`` open
after deleting it. What must hold: the checkpoint sees the container's files
through its own mount namespace (the deleted file listed, its content copied); a
``runc restore`` whose pre-restore hook would roll back a tree runc has already bound
for CRIU is refused, naming the way that works, and changes nothing; that way
(``snapcore restore ID --in-place -- runc restore``) gives back a container that
goes on from the checkpoint's counter, on the checkpoint's files, with its deleted
file intact; and a needed file changed while CRIU holds the tasks fails the
checkpoint (``on_change: fail``) and leaves the container running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapcore import main
from snapcore.testing import LoopFactory, Pace

#: The container: the deleted-but-open file, then the counter, one step per 50 ms.
PROGRAM = (
    "echo 'held while deleted' > /data/deleted; exec 3</data/deleted; rm /data/deleted; exec 4</data/keep; "
    "i=$(cat /data/count 2>/dev/null || echo 0); while :; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"
)


@dataclass
class Container:
    """A runc container on a btrfs subvolume, and snapcore's CRIU hook for it."""

    id: str
    rootfs: Path
    bundle: Path
    runc: list[str]
    state_dir: Path
    tmp: Path

    def run(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """``runc ARGS``. Its stdio is /dev/null: a detached container inherits it (a
        pipe would never reach EOF; a file outside the container cannot be dumped);
        what runc says goes to its ``--log`` file, returned as ``stderr``."""
        log = self.tmp / "runc.log"
        log.unlink(missing_ok=True)
        done = subprocess.run(
            [*self.runc, "--log", str(log), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if "-d" in args or "run" in args else subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            check=False,
            timeout=timeout,
        )
        said = log.read_text(errors="replace") if log.exists() else ""
        if check and done.returncode != 0:
            raise AssertionError(f"runc {' '.join(args)}: exit {done.returncode}: {said[-2000:]}")
        return subprocess.CompletedProcess(done.args, done.returncode, done.stdout or "", said)

    def pid(self) -> int:
        return int(json.loads(self.run("state", self.id).stdout)["pid"])

    def count(self) -> int:
        return int((self.rootfs / "data" / "count").read_text().strip() or 0)

    def wait_count(self, above: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            with_value = self.count_or_none()
            if with_value is not None and with_value > above:
                return with_value
            if time.monotonic() > deadline:
                raise AssertionError(f"the container's counter did not pass {above} within {timeout:.0f}s")
            time.sleep(0.02)

    def count_or_none(self) -> int | None:
        try:
            return self.count()
        except (OSError, ValueError):
            return None


def _busybox_rootfs(root: Path) -> None:
    for d in ("bin", "proc", "dev", "sys", "tmp", "data", "etc"):
        (root / d).mkdir(exist_ok=True)
    shutil.copy2("/usr/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "sleep", "cat", "echo", "rm"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (root / "data" / "keep").write_text("needed by the container\n")


@pytest.fixture
def container(
    loop_fs: LoopFactory, tmp_path: Path, state_dir: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch, pace: Pace
) -> Iterator[Container]:
    from snapcore.errors import CriuUnavailable
    from snapcore.tasks.criu import check_criu

    if shutil.which("runc") is None:
        pytest.skip("runc is missing: apt-get install --no-install-recommends runc (make setup does)")
    if not os.path.exists("/usr/bin/busybox"):
        pytest.skip("busybox is missing: apt-get install busybox-static")
    try:
        criu = check_criu()
    except CriuUnavailable as exc:
        pytest.skip(f"CRIU unusable here: {exc}")
    monkeypatch.setenv("SNAPCORE_PLUGINS", "btrfs,fsfreeze")
    rootfs = loop_fs("btrfs").mount_subvolume("rootfs", tmp_path / "rootfs")
    _busybox_rootfs(rootfs)
    hook, criu_conf, bundle = tmp_path / "snapcore-hook", tmp_path / "criu.conf", tmp_path / "bundle"
    argv = ["--state-dir", str(state_dir), "--run-dir", str(run_dir), "criu-hook", "--write-script", str(hook)]
    assert main(argv) == 0
    criu_conf.write_text(f"action-script {hook}\n")
    bundle.mkdir()
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": False}
    config["process"]["terminal"] = False
    config["process"]["args"] = ["sh", "-c", PROGRAM]
    # no network namespace: CRIU would need iptables-restore to lock it
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    config["annotations"] = {"org.criu.config": str(criu_conf)}
    (bundle / "config.json").write_text(json.dumps(config))
    ctr = Container(
        id=f"snapcore-test-{os.getpid()}",
        rootfs=rootfs,
        bundle=bundle,
        runc=["runc", "--root", str(tmp_path / "runc-state"), "--criu", criu.path],
        state_dir=state_dir,
        tmp=tmp_path,
    )
    try:
        ctr.run("run", "-d", "--bundle", str(bundle), ctr.id)
        ctr.wait_count(2, pace.seconds(30))
        yield ctr
    finally:
        ctr.run("delete", "-f", ctr.id, check=False)
        # runc binds the rootfs for CRIU at restore; a failed restore may leave it
        subprocess.run(["umount", "-R", str(tmp_path / "runc-state" / ctr.id / "criu-root")], capture_output=True)


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


def test_runc_checkpoint_then_restore_files_first(container: Container, pace: Pace) -> None:
    ctr = container
    images, work = ctr.tmp / "images", ctr.tmp / "work"
    done = ctr.run("checkpoint", "--image-path", str(images), "--work-path", str(work), ctr.id, check=False)
    dump_log = _log(work / "dump.log")
    assert done.returncode == 0, done.stderr + dump_log[-3000:]
    assert dump_log.count("of the dumped tasks' filesystems") == 1, dump_log[-3000:]
    at_checkpoint = ctr.count()
    [checkpoint_id] = [p.name for p in (ctr.state_dir / "checkpoints").iterdir()]
    assert (images / "snapcore-checkpoint").read_text().split()[0] == checkpoint_id
    manifest = json.loads((ctr.state_dir / "checkpoints" / checkpoint_id / "manifest.json").read_text())
    assert manifest["outcome"] == "ok", manifest.get("error")
    [target] = manifest["targets"]
    assert target["mount"] == str(ctr.rootfs) and target["imager"] == "btrfs"
    assert target["consistency"] == "tasks-frozen" and manifest["tasks"]["method"] == "stopped by CRIU"
    files = {f["path"]: f for f in manifest["files"]}
    deleted = files["/data/deleted"]  # as the container sees it
    assert deleted["state"] == "deleted" and deleted["ghost"]["sha256"]
    assert deleted["host_path"] == f"{ctr.rootfs}/data/deleted"
    assert files["/data/keep"]["host_path"] == f"{ctr.rootfs}/data/keep"
    # its /dev/null comes from the container's own /dev (a tmpfs the host lacks): a
    # device, nothing to keep, no warning
    assert manifest["warnings"] == [], manifest["warnings"]

    # the tree is damaged after the checkpoint
    (ctr.rootfs / "data" / "count").write_text("garbage\n")
    (ctr.rootfs / "stray").write_text("not in the checkpoint\n")
    shutil.rmtree(ctr.rootfs / "etc")

    # runc restore alone: its pre-restore hook would roll back a tree that runc has
    # already bound for CRIU, so the container would run on the damaged one: refused
    refused = ctr.run(
        "restore",
        "-d",
        "--bundle",
        str(ctr.bundle),
        "--image-path",
        str(images),
        "--work-path",
        str(ctr.tmp / "work-refused"),
        ctr.id,
        check=False,
    )
    restore_log = _log(ctr.tmp / "work-refused" / "restore.log")
    assert refused.returncode != 0
    assert "shows the same tree (a bind mount)" in restore_log, restore_log[-3000:]
    assert f"snapcore restore {checkpoint_id} --in-place -- RUNTIME restore" in restore_log, restore_log[-3000:]
    assert (ctr.rootfs / "stray").exists() and not (ctr.rootfs / "etc").exists()  # nothing was changed
    ctr.run("delete", "-f", ctr.id, check=False)

    # the way that works: the files first, then runc (its hook sees they are in place)
    restore = [*ctr.runc, "restore", "-d", "--bundle", str(ctr.bundle), "--image-path", str(images)]
    restore += ["--work-path", str(ctr.tmp / "work2"), ctr.id]
    argv = ["--state-dir", str(ctr.state_dir), "restore", checkpoint_id, "--in-place", "--", *restore]
    assert main(argv) == 0, _log(ctr.tmp / "work2" / "restore.log")[-3000:]
    assert "is in place already" in _log(ctr.tmp / "work2" / "restore.log")
    assert not (ctr.rootfs / "stray").exists() and (ctr.rootfs / "etc" / "passwd").exists()
    after = ctr.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)  # it went on from there
    pid = ctr.pid()
    assert os.readlink(f"/proc/{pid}/fd/3") == "/data/deleted (deleted)"
    assert Path(f"/proc/{pid}/fd/3").read_text() == "held while deleted\n"


def test_runc_checkpoint_fails_when_a_needed_file_changes(
    container: Container, write_policy: object, pace: Pace
) -> None:
    """``on_change: fail``: a file the container holds open is rewritten from the host
    all through the dump; the checkpoint fails, CRIU resumes the container."""
    ctr = container
    policy = write_policy(f"version: 1\nmounts:\n  {ctr.rootfs}:\n    imager: btrfs\n    on_change: fail\n")  # type: ignore[operator]
    hook = ctr.tmp / "snapcore-hook"
    argv = ["--state-dir", str(ctr.state_dir), "criu-hook", "--policy", str(policy), "--write-script", str(hook)]
    assert main(argv) == 0
    stop = threading.Event()

    def rewrite() -> None:
        keep = ctr.rootfs / "data" / "keep"
        while not stop.is_set():
            with open(keep, "a") as f:
                f.write("changed under the container\n")
            time.sleep(0.001)

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        work = ctr.tmp / "work"
        done = ctr.run(
            "checkpoint", "--image-path", str(ctr.tmp / "images"), "--work-path", str(work), ctr.id, check=False
        )
    finally:
        stop.set()
        writer.join()
    dump_log = _log(work / "dump.log")
    assert done.returncode != 0, dump_log[-3000:]
    assert "/data/keep" in dump_log and "modif" in dump_log, dump_log[-3000:]
    [checkpoint_id] = [p.name for p in (ctr.state_dir / "checkpoints").iterdir()]
    manifest = json.loads((ctr.state_dir / "checkpoints" / checkpoint_id / "manifest.json").read_text())
    assert manifest["outcome"] == "failed" and "/data/keep" in manifest["error"], manifest["error"]
    # CRIU resumed the container: it goes on counting
    state = json.loads(ctr.run("state", ctr.id).stdout)["status"]
    assert state == "running", state
    before = ctr.count()
    ctr.wait_count(before, pace.seconds(30))
