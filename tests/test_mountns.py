"""Tasks in a mount namespace of their own, as in a container: their files are found
through the host's mounts, and what the host cannot see is named, never dropped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import snapcore
from snapcore import UsageError
from snapcore.testing import LoopFactory
from snapcore.testing.processes import Holders


def in_namespace(script: str) -> list[str]:
    """A wrapper that runs ``script`` in a new, private mount namespace, then execs
    the holder there (the same pid: unshare and sh exec, they do not fork)."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-ec", script + '\nexec "$@"', "sh"]


@pytest.fixture
def container(loop_fs: LoopFactory, tmp_path: Path) -> dict[str, Path]:
    fs = loop_fs("ext4")
    (fs.mount_point / "rootfs" / "data").mkdir(parents=True)
    (fs.mount_point / "rootfs" / "data" / "keep.txt").write_text("kept\n")
    (fs.mount_point / "rootfs" / "data" / "gone.txt").write_text("deleted under the task\n")
    (fs.mount_point / "rootfs" / "data" / "over.txt").write_text("the old content\n")
    (fs.mount_point / "rootfs" / "data" / "lib.so").write_bytes(b"mapped, no descriptor left\n" * 100)
    inside, private = tmp_path / "inside", tmp_path / "private"
    inside.mkdir()
    private.mkdir()
    return {"fs": fs.mount_point, "inside": inside, "private": private}


def test_files_of_a_task_in_another_mount_namespace_map_onto_the_host_mount(
    container: dict[str, Path], holder: Holders, state_dir: Path, write_policy: snapcore.testing.WritePolicy
) -> None:
    fs, inside, private = container["fs"], container["inside"], container["private"]
    wrap = in_namespace(
        f"mount --bind {fs}/rootfs/data {inside}\nmount -t tmpfs scratch {private}\necho t > {private}/t"
    )
    pid = holder(
        f"r:{inside}/keep.txt",
        f"r:{inside}/gone.txt",
        f"r:{inside}/over.txt",
        f"m:{inside}/lib.so",
        f"r:{private}/t",
        f"cwd:{inside}",
        wrap=wrap,
    )
    assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
    assert not os.path.exists(inside / "keep.txt")  # the bind mount is the task's alone
    (fs / "rootfs" / "data" / "gone.txt").unlink()  # deleted under the task, from the host
    (fs / "rootfs" / "data" / "new.txt").write_text("renamed over the old one\n")
    (fs / "rootfs" / "data" / "new.txt").rename(fs / "rootfs" / "data" / "over.txt")

    policy = write_policy(f"version: 1\nmounts:\n  {fs}:\n    imager: fsfreeze\n")
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, pid=pid)

    assert [t.mount for t in manifest.targets] == [str(fs)]
    files = {f["path"]: f for f in json.loads(manifest.dumps())["files"]}
    keep = files[f"{inside}/keep.txt"]
    assert keep["host_path"] == f"{fs}/rootfs/data/keep.txt" and keep["mount"] == str(fs)
    assert keep["state"] == "present"
    gone = files[f"{inside}/gone.txt"]
    assert gone["state"] == "deleted" and gone["host_path"] == f"{fs}/rootfs/data/gone.txt"
    assert gone["ghost"] and gone["ghost"]["sha256"]  # copied through the task's descriptor
    assert files[str(inside)]["host_path"] == f"{fs}/rootfs/data"  # its cwd
    over = files[f"{inside}/over.txt"]
    assert over["state"] == "renamed-over" and over["ghost"] and over["host_path"] == f"{fs}/rootfs/data/over.txt"
    mapped = files[f"{inside}/lib.so"]
    assert mapped["mapped"] and mapped["host_path"] == f"{fs}/rootfs/data/lib.so" and mapped["mount"] == str(fs)
    assert f"{private}/t" not in files
    unmapped = [w for w in manifest.warnings if f"{private} in its mount namespace" in w]
    assert unmapped and "tmpfs" in unmapped[0] and "not checkpointed" in unmapped[0], manifest.warnings


def test_a_task_whose_files_the_host_cannot_see_fails_saying_why(
    container: dict[str, Path], holder: Holders, state_dir: Path, write_policy: snapcore.testing.WritePolicy
) -> None:
    private = container["private"]
    wrap = in_namespace(f"mount -t tmpfs scratch {private}\necho t > {private}/t\ncd {private}")
    pid = holder(f"r:{private}/t", wrap=wrap)
    policy = write_policy(f"version: 1\nmounts:\n  {container['fs']}:\n    imager: fsfreeze\n")
    with pytest.raises(UsageError, match=rf"no mount that can be checkpointed: pid {pid}: {private} in its mount"):
        snapcore.checkpoint(policy=policy, state_dir=state_dir, pid=pid)


def test_restore_in_place_refuses_while_another_namespace_shows_the_old_tree(
    loop_fs: LoopFactory, tmp_path: Path, state_dir: Path, holder: Holders, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount namespace that copied the mount privately (a container's, CRIU's) keeps
    the tree an in-place restore replaces: whatever runs there would start on it."""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "btrfs,fsfreeze")
    mnt = loop_fs("btrfs").mount_subvolume("data", tmp_path / "data")
    (mnt / "f").write_text("at the checkpoint\n")
    manifest = snapcore.checkpoint([mnt], state_dir=state_dir)
    (mnt / "f").write_text("after\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pid = holder(f"cwd:{elsewhere}", wrap=in_namespace(f"mount --bind {mnt} {elsewhere}"))
    with pytest.raises(
        snapcore.MountBusy, match=rf"pid {pid} \(python[^)]*: mounts it at .* in its own mount namespace"
    ):
        snapcore.restore(manifest.id, in_place=True, state_dir=state_dir)
    assert (mnt / "f").read_text() == "after\n"  # nothing was changed
    holder.close()
    snapcore.restore(manifest.id, in_place=True, state_dir=state_dir)
    assert (mnt / "f").read_text() == "at the checkpoint\n"
