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

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from snapcore import main
from snapcore.testing import LoopFactory, Pace
from snapcore.testing.containers import (
    COUNTER_PROGRAM,
    HELD_WHILE_DELETED,
    busybox_rootfs,
    read_count,
    runc_bundle,
    wait_for_count,
)

#: The container: a file held open after it is deleted, a needed file, the counter.
PROGRAM = "exec 4</data/keep; " + COUNTER_PROGRAM


@dataclass
class Container:
    """A runc container on a btrfs subvolume, and snapcore's CRIU hook for it."""

    id: str
    rootfs: Path
    #: where the host sees the container's /data
    data: Path
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
        value = read_count(self.data / "count")
        assert value is not None, f"no counter in {self.data}"
        return value

    def wait_count(self, above: int, timeout: float) -> int:
        return wait_for_count(self.data / "count", above, timeout)

    def restore_alone(self, images: Path, work: Path) -> subprocess.CompletedProcess[str]:
        """``runc restore`` from ``images`` with the container's own bundle."""
        args = ["restore", "-d", "--bundle", str(self.bundle), "--image-path", str(images), "--work-path", str(work)]
        return self.run(*args, self.id, check=False)


@pytest.fixture
def runc_container(
    tmp_path: Path, state_dir: Path, run_dir: Path, pace: Pace, criu: Any
) -> Iterator[Callable[..., Container]]:
    """``runc_container(rootfs, volumes={"/data": DIR}, policy=F)``: a running
    container with snapcore's hook, deleted (and runc's binds undone) at teardown."""
    if shutil.which("runc") is None:
        pytest.skip("runc is missing: apt-get install --no-install-recommends runc (make setup does)")
    if not os.path.exists("/usr/bin/busybox"):
        pytest.skip("busybox is missing: apt-get install busybox-static")
    made: list[Container] = []

    def make(rootfs: Path, volumes: dict[str, Path] | None = None, policy: Path | None = None) -> Container:
        busybox_rootfs(rootfs)
        hook, criu_conf, bundle = tmp_path / "snapcore-hook", tmp_path / "criu.conf", tmp_path / "bundle"
        argv = ["--state-dir", str(state_dir), "--run-dir", str(run_dir), "criu-hook", "--write-script", str(hook)]
        assert main(argv + (["--policy", str(policy)] if policy else [])) == 0
        criu_conf.write_text(f"action-script {hook}\n")
        runc_bundle(bundle, rootfs, PROGRAM, criu_conf=criu_conf, volumes=volumes)
        data = (volumes or {}).get("/data", rootfs / "data")
        (data / "keep").write_text("needed by the container\n")
        ctr = Container(
            id=f"snapcore-test-{os.getpid()}-{len(made)}",
            rootfs=rootfs,
            data=data,
            bundle=bundle,
            runc=["runc", "--root", str(tmp_path / "runc-state"), "--criu", criu.path],
            state_dir=state_dir,
            tmp=tmp_path,
        )
        made.append(ctr)
        ctr.run("run", "-d", "--bundle", str(bundle), ctr.id)
        ctr.wait_count(2, pace.seconds(30))
        return ctr

    try:
        yield make
    finally:
        for ctr in made:
            ctr.run("delete", "-f", ctr.id, check=False)
            # runc binds the rootfs for CRIU at restore; a failed restore may leave it
            criu_root = tmp_path / "runc-state" / ctr.id / "criu-root"
            subprocess.run(["umount", "-R", str(criu_root)], capture_output=True)


@pytest.fixture
def container(
    loop_fs: LoopFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runc_container: Callable[..., Container]
) -> Container:
    """The container with its rootfs on a btrfs subvolume mounted on its own."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "btrfs,fsfreeze")
    return runc_container(loop_fs("btrfs").mount_subvolume("rootfs", tmp_path / "rootfs"))


def _log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


@contextlib.contextmanager
def _rewritten(path: Path) -> Iterator[None]:
    """``path`` appended to without a pause while the block runs, by a process of its
    own: always runnable, it writes inside the few milliseconds of a checkpoint's
    window however loaded the machine is (a thread here that slept 1 ms between
    writes was once starved through the whole window)."""
    line = shlex.quote("changed under the container")
    writer = subprocess.Popen(["sh", "-c", f"while :; do echo {line} >> {shlex.quote(str(path))}; done"])
    try:
        yield
    finally:
        writer.kill()
        writer.wait()


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
    (ctr.data / "count").write_text("garbage\n")
    (ctr.rootfs / "stray").write_text("not in the checkpoint\n")
    shutil.rmtree(ctr.rootfs / "etc")

    # runc restore alone: its pre-restore hook would roll back a tree that runc has
    # already bound for CRIU, so the container would run on the damaged one: refused
    refused = ctr.restore_alone(images, ctr.tmp / "work-refused")
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
    assert "was restored already" in _log(ctr.tmp / "work2" / "restore.log")
    assert not (ctr.rootfs / "stray").exists() and (ctr.rootfs / "etc" / "passwd").exists()
    after = ctr.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)  # it went on from there
    pid = ctr.pid()
    assert os.readlink(f"/proc/{pid}/fd/3") == "/data/deleted (deleted)"
    assert Path(f"/proc/{pid}/fd/3").read_text() == HELD_WHILE_DELETED


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
    work = ctr.tmp / "work"
    with _rewritten(ctr.data / "keep"):
        done = ctr.run(
            "checkpoint", "--image-path", str(ctr.tmp / "images"), "--work-path", str(work), ctr.id, check=False
        )
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


def _two_ext4(
    loop_fs: LoopFactory, tmp_path: Path, write_policy: Callable[..., Path], exporter: str
) -> tuple[Any, Any, Path]:
    """Two ext4 filesystems (a rootfs's, a volume's) and a policy that freezes each and
    copies it with ``exporter`` into ``tmp_path/exports``; the rootfs is
    ``containers/web`` on the first, the volume ``web-data`` on the second."""
    system, volume, exports = loop_fs("ext4"), loop_fs("ext4"), tmp_path / "exports"
    exports.mkdir()
    (system.mount_point / "containers" / "web").mkdir(parents=True)
    (volume.mount_point / "web-data").mkdir()
    rule = f"    imager: fsfreeze\n    exporter: {exporter}\n    options:\n      {exporter}:\n        dest: {exports}\n"
    policy = write_policy("version: 1\nmounts:\n" + "".join(f"  {m.mount_point}:\n" + rule for m in (system, volume)))
    return system, volume, policy


def _restore_copy_then_runc(ctr: Container, checkpoint_id: str, images: Path, rootfs: Path, data: Path) -> Container:
    """``snapcore restore ID --to COPY -- runc restore`` with a bundle whose root and
    /data volume are in the copy (each mount lands at COPY/<its mount point>); the
    container as it runs now."""
    copy = ctr.tmp / "copy"
    new_rootfs, new_data = copy / str(rootfs).lstrip("/"), copy / str(data).lstrip("/")
    bundle2 = ctr.tmp / "bundle2"
    runc_bundle(bundle2, new_rootfs, PROGRAM, criu_conf=ctr.tmp / "criu.conf", volumes={"/data": new_data})
    restore = [*ctr.runc, "restore", "-d", "--bundle", str(bundle2), "--image-path", str(images)]
    restore += ["--work-path", str(ctr.tmp / "work2"), ctr.id]
    back = _snapcore("--state-dir", str(ctr.state_dir), "restore", checkpoint_id, "--to", str(copy), "--", *restore)
    assert back.returncode == 0, back.stderr + _log(ctr.tmp / "work2" / "restore.log")[-3000:]
    return Container(**{**ctr.__dict__, "rootfs": new_rootfs, "data": new_data})


def test_runc_on_ext4_with_a_volume_restored_as_a_copy(
    loop_fs: LoopFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    runc_container: Callable[..., Container],
    write_policy: Callable[..., Path],
    pace: Pace,
) -> None:
    """A rootfs directory and a data volume on two ext4 filesystems: frozen (fsfreeze)
    and copied by tar while CRIU holds the container; restored as a copy (tar restores
    into a new directory), and the container restored by runc from a bundle that
    points at the copy."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,tar")
    system, volume, policy = _two_ext4(loop_fs, tmp_path, write_policy, "tar")
    rootfs, data = system.mount_point / "containers" / "web", volume.mount_point / "web-data"
    ctr = runc_container(rootfs, volumes={"/data": data}, policy=policy)
    images, work = ctr.tmp / "images", ctr.tmp / "work"
    done = ctr.run("checkpoint", "--image-path", str(images), "--work-path", str(work), ctr.id, check=False)
    assert done.returncode == 0, done.stderr + _log(work / "dump.log")[-3000:]
    at_checkpoint = ctr.count()
    checkpoint_id = (images / "snapcore-checkpoint").read_text().split()[0]
    manifest = json.loads((ctr.state_dir / "checkpoints" / checkpoint_id / "manifest.json").read_text())
    assert manifest["outcome"] == "ok", manifest.get("error")
    assert sorted(t["mount"] for t in manifest["targets"]) == sorted([str(system.mount_point), str(volume.mount_point)])
    assert {t["consistency"] for t in manifest["targets"]} == {"fs-frozen"}
    files = {f["path"]: f for f in manifest["files"]}
    assert files["/data/keep"]["host_path"] == f"{data}/keep" and files["/data/keep"]["mount"] == str(
        volume.mount_point
    )
    assert files["/bin/busybox"]["host_path"] == f"{rootfs}/bin/busybox"
    assert manifest["warnings"] == [], manifest["warnings"]

    (data / "count").write_text("garbage\n")  # damaged after the checkpoint

    # runc restore alone: its hook cannot restore tar exports in place, and says what to do
    refused = ctr.restore_alone(images, tmp_path / "work-refused")
    assert refused.returncode != 0
    assert f"snapcore restore {checkpoint_id} --to DIR -- RUNTIME restore" in _log(
        tmp_path / "work-refused" / "restore.log"
    )
    ctr.run("delete", "-f", ctr.id, check=False)

    # a copy, and runc on it: a bundle whose root and volume are in the copy
    moved = _restore_copy_then_runc(ctr, checkpoint_id, images, rootfs, data)
    assert "was restored already" in _log(tmp_path / "work2" / "restore.log")
    after = moved.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)
    pid = ctr.pid()
    assert Path(f"/proc/{pid}/fd/3").read_text() == HELD_WHILE_DELETED
    assert os.readlink(f"/proc/{pid}/fd/4") == "/data/keep"


# -- snapcore checkpoint --container: snapcore runs runc, CRIU's post-dump is relayed --


def _snapcore(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The ``snapcore`` command, as a user runs it: its own process."""
    return subprocess.run(
        [sys.executable, "-m", "snapcore", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env=env,
        check=False,
    )


def _wrapped_checkpoint(ctr: Container, run_dir: Path, images: Path, *extra: str, **kw: Any) -> Any:
    runtime = [*ctr.runc, "--log", str(ctr.tmp / "runc.log")]
    argv = ["--state-dir", str(ctr.state_dir), "--run-dir", str(run_dir), "checkpoint", *extra]
    argv += ["--container", f"runc:{ctr.id}", "--", *runtime, "checkpoint", "--image-path", str(images)]
    return _snapcore(*argv, "--work-path", str(images), ctr.id, **kw)


def test_runc_checkpoint_through_snapcore_container(container: Container, run_dir: Path, pace: Pace) -> None:
    """``snapcore checkpoint --container runc:ID -- runc ... checkpoint ... ID``: one
    checkpoint, made by the running snapcore (the container's own hook, named in its
    CRIU config too, leaves the dump to it), the manifest naming the container; the
    files first, then runc restore: the container goes on from there."""
    ctr = container
    images = ctr.tmp / "images"
    # the user's own CRIU_CONFIG_FILE is carried into the relay's; this one runs the
    # relay's action script a second time in the same dump, as CRIU 4.1 does with
    # every script when a runtime drives it
    again = ctr.tmp / "run-relay-again"
    again.write_text('#!/bin/sh\nexec "$(sed -n "s/^action-script //p" "$CRIU_CONFIG_FILE" | tail -n 1)"\n')
    again.chmod(0o755)
    user_config = ctr.tmp / "user-criu.conf"
    user_config.write_text(f"action-script {again}\n")
    done = _wrapped_checkpoint(ctr, run_dir, images, env={**os.environ, "CRIU_CONFIG_FILE": str(user_config)})
    dump_log = _log(images / "dump.log")
    assert done.returncode == 0, done.stderr + dump_log[-3000:]
    at_checkpoint = ctr.count()
    [checkpoint_id] = [p.name for p in (ctr.state_dir / "checkpoints").iterdir()]
    assert checkpoint_id in done.stdout
    assert (images / "snapcore-checkpoint").read_text().split()[0] == checkpoint_id
    # two answers, one checkpoint
    said = f"checkpoint {checkpoint_id} of the dumped tasks' filesystems"
    assert dump_log.count(said) == 2 and dump_log.count("of the dumped tasks' filesystems") == 2, dump_log[-3000:]
    assert "handled by 'snapcore checkpoint --container'" in dump_log, dump_log[-3000:]
    manifest = json.loads((ctr.state_dir / "checkpoints" / checkpoint_id / "manifest.json").read_text())
    assert manifest["outcome"] == "ok", manifest.get("error")
    assert manifest["tasks"]["container"] == f"runc:{ctr.id}" and manifest["tasks"]["method"] == "stopped by CRIU"
    assert manifest["criu"]["via"] == f"snapcore checkpoint --container runc:{ctr.id}"
    [target] = manifest["targets"]
    assert target["mount"] == str(ctr.rootfs) and target["consistency"] == "tasks-frozen"
    files = {f["path"]: f for f in manifest["files"]}
    assert files["/data/deleted"]["state"] == "deleted" and files["/data/deleted"]["ghost"]["sha256"]
    assert not list((run_dir / "relay").iterdir())  # the relay is gone with the command

    (ctr.data / "count").write_text("garbage\n")
    (ctr.rootfs / "stray").write_text("not in the checkpoint\n")
    ctr.run("delete", "-f", ctr.id, check=False)
    restore = [*ctr.runc, "restore", "-d", "--bundle", str(ctr.bundle), "--image-path", str(images)]
    restore += ["--work-path", str(ctr.tmp / "work2"), ctr.id]
    back = _snapcore("--state-dir", str(ctr.state_dir), "restore", checkpoint_id, "--in-place", "--", *restore)
    assert back.returncode == 0, back.stderr + _log(ctr.tmp / "work2" / "restore.log")[-3000:]
    assert not (ctr.rootfs / "stray").exists()
    after = ctr.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)
    assert Path(f"/proc/{ctr.pid()}/fd/3").read_text() == HELD_WHILE_DELETED


def test_snapcore_container_fails_clearly_and_the_container_runs_on(
    container: Container, run_dir: Path, write_policy: Callable[..., Path], pace: Pace
) -> None:
    """A needed file rewritten all through the dump (``on_change: fail``): exit 1,
    the error says which file, CRIU resumes the container. Bad use is exit 2, and a
    container that is not there is exit 1 before anything runs."""
    ctr = container
    policy = write_policy(f"version: 1\nmounts:\n  {ctr.rootfs}:\n    imager: btrfs\n    on_change: fail\n")
    with _rewritten(ctr.data / "keep"):
        done = _wrapped_checkpoint(ctr, run_dir, ctr.tmp / "images", "--policy", str(policy))
    assert done.returncode == 1, done.stderr
    assert "/data/keep" in done.stderr and "the container runs on" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(ctr.run("state", ctr.id).stdout)["status"] == "running"
    ctr.wait_count(ctr.count(), pace.seconds(30))

    # a policy that would refuse the checkpoint refuses it before runc dumps anything
    uncovered = write_policy("version: 1\nuncovered: fail\nmounts:\n  /no/such/mount:\n    imager: btrfs\n")
    images = ctr.tmp / "images-refused"
    refused = _wrapped_checkpoint(ctr, run_dir, images, "--policy", str(uncovered))
    assert refused.returncode == 2 and "not covered by the policy" in refused.stderr, refused.stderr
    assert not images.exists() and json.loads(ctr.run("state", ctr.id).stdout)["status"] == "running"

    state = ["--state-dir", str(ctr.state_dir), "--run-dir", str(run_dir), "checkpoint"]
    bad = _snapcore(*state, "--container", f"docker:{ctr.id}")
    assert bad.returncode == 2 and "RUNTIME:ID" in bad.stderr, bad.stderr
    bad = _snapcore(*state, "--container", f"runc:{ctr.id}", "--", "runc", "checkpoint", "someone-else")
    assert bad.returncode == 2 and f"runc's checkpoint of {ctr.id}" in bad.stderr, bad.stderr
    gone = _snapcore(
        *state, "--container", "runc:no-such-container", "--", *ctr.runc, "checkpoint", "no-such-container"
    )
    assert gone.returncode == 1 and "no-such-container" in gone.stderr and "Traceback" not in gone.stderr, gone.stderr


def test_snapcore_container_killed_at_post_dump_leaves_the_container_running(
    container: Container, run_dir: Path, pace: Pace
) -> None:
    """snapcore SIGKILLed while CRIU waits on its relay (a fake of a crash, injected at
    the snapshot): the action script's wait ends at once, the dump fails, runc resumes
    the container, nothing is left frozen."""
    ctr = container
    env = {**os.environ, "SNAPCORE_FAULT": "snapshot=kill"}
    images = ctr.tmp / "images"
    t = time.monotonic()
    done = _wrapped_checkpoint(ctr, run_dir, images, env=env)
    assert done.returncode == -9, done.stderr
    dump_log = _log(images / "dump.log")
    assert "no answer from snapcore" in dump_log, dump_log[-3000:]
    # runc outlives snapcore: wait for it to resume the container
    deadline = time.monotonic() + pace.seconds(30)
    while json.loads(ctr.run("state", ctr.id).stdout)["status"] != "running":
        assert time.monotonic() < deadline, "the container was not resumed"
        time.sleep(0.05)
    ctr.wait_count(ctr.count(), pace.seconds(30))
    assert time.monotonic() - t < pace.seconds(60)


def test_snapcore_container_on_ext4_exported_by_rsync(
    loop_fs: LoopFactory,
    tmp_path: Path,
    run_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    runc_container: Callable[..., Container],
    write_policy: Callable[..., Path],
    pace: Pace,
) -> None:
    """``--container`` with a rootfs and a data volume on two ext4 filesystems, frozen
    (fsfreeze) and copied by rsync while CRIU holds the container; a file the container
    holds open renamed over from the host before the dump: listed as renamed-over with
    its old content copied. Restored as a copy, runc on the copy: the counter goes on,
    the descriptors show the old bytes."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,rsync")
    system, volume, policy = _two_ext4(loop_fs, tmp_path, write_policy, "rsync")
    rootfs, data = system.mount_point / "containers" / "web", volume.mount_point / "web-data"
    ctr = runc_container(rootfs, volumes={"/data": data})
    (data / "keep.new").write_text("the new content\n")
    os.rename(data / "keep.new", data / "keep")  # over the file the container holds (fd 4)
    images = tmp_path / "images"
    done = _wrapped_checkpoint(ctr, run_dir, images, "--policy", str(policy))
    assert done.returncode == 0, done.stderr + _log(images / "dump.log")[-3000:]
    at_checkpoint = ctr.count()
    checkpoint_id = (images / "snapcore-checkpoint").read_text().split()[0]
    manifest = json.loads((ctr.state_dir / "checkpoints" / checkpoint_id / "manifest.json").read_text())
    assert manifest["outcome"] == "ok", manifest.get("error")
    assert {t["exporter"] for t in manifest["targets"]} == {"rsync"}
    assert {t["consistency"] for t in manifest["targets"]} == {"fs-frozen"}
    files = {f["path"]: f for f in manifest["files"]}
    assert files["/data/keep"]["state"] == "renamed-over" and files["/data/keep"]["ghost"]["sha256"]
    assert files["/data/deleted"]["state"] == "deleted" and files["/data/deleted"]["ghost"]["sha256"]
    assert manifest["tasks"]["container"] == f"runc:{ctr.id}"

    (data / "count").write_text("garbage\n")
    ctr.run("delete", "-f", ctr.id, check=False)
    moved = _restore_copy_then_runc(ctr, checkpoint_id, images, rootfs, data)
    after = moved.wait_count(at_checkpoint, pace.seconds(30))
    assert at_checkpoint < after < at_checkpoint + 200, (at_checkpoint, after)
    pid = ctr.pid()
    assert Path(f"/proc/{pid}/fd/3").read_text() == HELD_WHILE_DELETED
    assert Path(f"/proc/{pid}/fd/4").read_text() == "needed by the container\n"  # the old one
    assert (moved.data / "keep").read_text() == "the new content\n"


def test_snapcore_container_deletes_its_checkpoint_when_the_runtime_fails_after_it(
    container: Container, run_dir: Path
) -> None:
    """A fake of a failure that cannot be caused on demand: a runtime that fails after
    its CRIU's post-dump (a wrapper around runc that exits 1 once runc is done). The
    checkpoint made at post-dump goes with no dump: it is deleted, exit 1."""
    ctr = container
    fake = ctr.tmp / "fake-runc-fails-after-dump"
    fake.write_text(
        '#!/bin/sh\nrunc "$@" || exit\ncase " $* " in *" checkpoint "*)\n'
        '  echo "fake runtime: failing after the dump" >&2; exit 1 ;;\nesac\n'
    )
    fake.chmod(0o755)
    images = ctr.tmp / "images"
    argv = ["--state-dir", str(ctr.state_dir), "--run-dir", str(run_dir), "checkpoint", "--container", f"runc:{ctr.id}"]
    argv += ["--", str(fake), *ctr.runc[1:], "checkpoint", "--image-path", str(images), "--work-path", str(images)]
    done = _snapcore(*argv, ctr.id)
    assert done.returncode == 1, done.stderr
    assert "has no dump to go with: checkpoint" in done.stderr and "was deleted" in done.stderr, done.stderr
    assert "of the dumped tasks' filesystems" in _log(images / "dump.log")  # it was made, then deleted
    assert not list((ctr.state_dir / "checkpoints").iterdir())
    snapshots = ctr.rootfs / ".snapshots"
    assert not snapshots.exists() or not list(snapshots.iterdir())  # its btrfs snapshot went too
