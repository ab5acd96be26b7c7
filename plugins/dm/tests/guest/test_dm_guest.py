"""The dm backend on real device-mapper: runs inside the test VM only.

Thick and thin LVM volumes on a loop device in the guest's /run, ext4 and xfs on
them, and a raw dm device; every test checks the origin is left as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dmguest import VG, Volume, VolumeFactory, drop_loop, installed, make_loop, sh

import snapcore
from snapcore import Checkpoint, CheckpointFailed, Image, find_mount, main, make_plugins
from snapcore.testing import describe_tree, image_of, target_of
from snapcore.testing.trees import Description
from snapcore_dm import backend, devices, hooks, restore

#: what a volume's tree is compared without
LOST_FOUND = ("lost+found",)


def fill(vol: Volume, n: int = 20) -> Description:
    for i in range(n):
        vol.write(f"d{i % 4}/f{i}.bin", os.urandom(4096 + i * 100))
    vol.write("top.txt", "before the checkpoint\n")
    os.sync()
    return describe_tree(vol.mount_point, skip=LOST_FOUND)


WRITER = r"""
import os, sys, time
root = sys.argv[1]
log = os.open(os.path.join(root, "seq.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while True:
    os.write(log, b"%d\n" % i)
    with open(os.path.join(root, "w", "%06d" % i), "wb") as f:
        f.write(b"x" * 1000)
    if i % 10 == 0:
        os.fsync(log)
    i += 1
    time.sleep(0.002)
"""


class Writer:
    """Writes numbered files and a sequence log without pause, in a child process."""

    def __init__(self, root: Path) -> None:
        (root / "w").mkdir(exist_ok=True)
        self.root = root
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)])

    def count(self) -> int:
        return len(os.listdir(self.root / "w"))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def check_prefix(image: Path) -> int:
    """The image's writer output is one consistent instant: files 0..K, log a prefix."""
    names = sorted(os.listdir(image / "w"))
    n = len(names)
    assert names == [f"{i:06d}" for i in range(n)], "gaps in the writer's files"
    lines = (image / "seq.log").read_bytes().split(b"\n")
    seq = [int(x) for x in lines if x]
    assert seq == list(range(len(seq))), "the sequence log is not a prefix"
    # the log line is written before the file: the log may be one ahead
    assert len(seq) in (n, n + 1), (len(seq), n)
    return n


def dm_policy(write_policy: Callable[[str], Path], mount: Path, extra: str = "", imager: str = "dm") -> Path:
    return write_policy(
        f"""version: 1
mounts:
  {mount}:
    imager: {imager}
{extra}"""
    )


# xfs on thin is covered by test_dm_with_tar_exporter (one xfs LV less: ~25 s of boot)
@pytest.mark.parametrize(("kind", "fstype"), [("thick", "ext4"), ("thin", "ext4"), ("thick", "xfs")])
def test_snapshot_is_checkpoint_time_tree(
    volume: VolumeFactory, write_policy: Any, state_dir: Path, kind: str, fstype: str
) -> None:
    vol = volume(kind, fstype)
    before = fill(vol)
    plugins = make_plugins()
    support = plugins.probe("dm", find_mount(vol.mount_point))
    assert support is not None and support.ok, support
    assert f"LVM {kind}" in support.reason
    writer = Writer(vol.mount_point)
    seen: dict[str, Any] = {}
    try:
        while writer.count() < 20:
            time.sleep(0.05)

        def payload(cp: Checkpoint) -> int:
            # the payload runs after the thaw with the snapshot mounted read-only
            path = backend.image_mount_dir(cp.id, str(vol.mount_point))
            assert os.path.ismount(path)
            seen["count_at_payload"] = writer.count()
            got = describe_tree(path, skip=LOST_FOUND)
            seen["static"] = {k: v for k, v in got.items() if k in before}
            seen["n"] = check_prefix(path)
            return 0

        low = writer.count()
        manifest = snapcore.checkpoint(
            policy=dm_policy(write_policy, vol.mount_point, "    options:\n      dm: {mount: true}\n"),
            state_dir=state_dir,
            payload=payload,
            plugins=plugins,
        )
        time.sleep(0.3)
        high = writer.count()
    finally:
        writer.stop()
    assert manifest.outcome == "ok", manifest.error
    (rec,) = manifest.targets
    assert rec.imager == "dm" and rec.consistency == "atomic"
    assert rec.image == f"{VG}/{vol.lv}-snapcore-{manifest.id}"
    assert seen["static"] == before
    # the image is the tree at one instant inside the checkpoint; writes went on
    assert low <= seen["n"] <= seen["count_at_payload"] < high
    # unmounted after the checkpoint, but kept, tagged, listed
    path = backend.image_mount_dir(manifest.id, str(vol.mount_point))
    assert not os.path.ismount(path)
    entries = plugins.list_images("dm", find_mount(vol.mount_point))
    assert [e.ref for e in entries] == [rec.image] and entries[0].checkpoint_id == manifest.id
    assert entries[0].problems == ()
    lv = devices.find_lv(VG, f"{vol.lv}-snapcore-{manifest.id}")
    assert lv is not None and "snapcore" in lv.tags and f"snapcore-checkpoint={manifest.id}" in lv.tags
    assert main(["--state-dir", str(state_dir), "verify", manifest.id]) == 0
    # restore to a new place: a copy of the checkpoint-time tree
    dest = Path(f"/run/snapcore-tests/restore-{vol.lv}")
    assert main(["--state-dir", str(state_dir), "restore", manifest.id, "--to", str(dest)]) == 0
    restored = describe_tree(dest, skip=LOST_FOUND)
    assert {k: v for k, v in restored.items() if k in before} == before
    assert check_prefix(dest) == seen["n"]
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    # discard deletes it, and only it
    target = target_of(manifest, rec, state_dir)
    plugins.discard("dm", target, image_of(rec), None)
    assert devices.find_lv(VG, f"{vol.lv}-snapcore-{manifest.id}") is None
    assert devices.find_lv(VG, vol.lv) is not None


def test_probe_says_why_not(volume: VolumeFactory, tmp_path: Path) -> None:
    support = backend.probe(find_mount("/run"))
    assert not support.ok and "not a device-mapper device" in support.reason
    loop = make_loop("plain", 32)
    mnt = tmp_path / "plain"
    mnt.mkdir()
    try:
        sh("mkfs.ext4", "-q", loop.device)
        sh("mount", loop.device, str(mnt))
        support = backend.probe(find_mount(mnt))
        assert not support.ok and "not a device-mapper device" in support.reason
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        drop_loop(loop)


def test_vg_without_free_extents_fails_cleanly(volume: VolumeFactory, write_policy: Any, state_dir: Path) -> None:
    vol = volume("thick", "ext4", size_mb=64)
    before = fill(vol, 4)
    free = devices.find_lv(VG, vol.lv)
    assert free is not None
    filler = "filler"
    sh("lvm", "lvcreate", "-q", "-y", "-W", "n", "-l", "100%FREE", "-n", filler, VG)
    try:
        support = backend.probe(find_mount(vol.mount_point))
        assert not support.ok and "no free extents" in support.reason, support.reason
        code = main(
            ["--state-dir", str(state_dir), "checkpoint", "--policy", str(dm_policy(write_policy, vol.mount_point))]
        )
        assert code in (1, 2)
    finally:
        sh("lvm", "lvremove", "-q", "-y", f"{VG}/{filler}")
    # a size larger than what is free: refused in prepare, nothing made
    policy = dm_policy(write_policy, vol.mount_point, "    options:\n      dm: {size: 100G}\n")
    with pytest.raises(CheckpointFailed, match=r"needs 100\.0 GiB"):
        snapcore.checkpoint(policy=policy, state_dir=state_dir)
    assert describe_tree(vol.mount_point, skip=LOST_FOUND) == before
    assert restore.list_lvm(devices.dm_device_of_mount(find_mount(vol.mount_point))) == []  # type: ignore[arg-type]


def test_thin_pool_nearly_full_is_refused(volume: VolumeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = volume("thin", "ext4", size_mb=64)
    monkeypatch.setattr(backend, "THIN_FULL_PERCENT", 0.0)
    support = backend.probe(find_mount(vol.mount_point))
    assert not support.ok and "full" in support.reason and "lvextend" in support.reason


def test_missing_tools_name_the_package(volume: VolumeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = volume("thick", "ext4", size_mb=32)
    monkeypatch.setenv("PATH", "/nonexistent")
    support = backend.probe(find_mount(vol.mount_point))
    assert not support.ok and "lvm2" in support.reason


def test_cow_overflow_is_detected(volume: VolumeFactory, write_policy: Any, state_dir: Path) -> None:
    vol = volume("thick", "ext4", size_mb=64)
    before = fill(vol, 4)
    policy = dm_policy(write_policy, vol.mount_point, "    options:\n      dm: {size: 4M, warn_percent: 1}\n")

    def payload(cp: Checkpoint) -> int:
        # writes during the checkpoint: the COW passes the warning threshold
        vol.write("during.bin", os.urandom(256 << 10))
        os.sync()
        return 0

    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, payload=payload)
    (rec,) = manifest.targets
    assert any("COW" in w and "full" in w for w in rec.warnings), rec.warnings
    assert snapcore.show(manifest.id, state_dir=state_dir).targets[0].warnings == rec.warnings  # written to disk too
    # now overflow it: 8 MiB of new data through a 4 MiB COW
    vol.write("big.bin", os.urandom(8 << 20))
    os.sync()
    assert main(["--state-dir", str(state_dir), "verify", manifest.id]) == 1
    target = target_of(manifest, rec, state_dir)
    problems = make_plugins().verify("dm", target, image_of(rec), None)
    assert problems and "INVALID" in problems[0]
    entries = hooks.snapcore_list_images(find_mount(vol.mount_point))
    assert entries and "INVALID" in entries[0].problems[0]
    with pytest.raises(snapcore.BackendError, match="INVALID"):
        hooks.snapcore_restore(target, image_of(rec), None, Path("/run/snapcore-tests/nope"), False)
    assert {k: v for k, v in describe_tree(vol.mount_point, skip=LOST_FOUND).items() if k in before} == before


@pytest.mark.parametrize("kind", ["thick", "thin"])
def test_merge_restore(volume: VolumeFactory, write_policy: Any, state_dir: Path, kind: str) -> None:
    vol = volume(kind, "ext4", size_mb=64)
    before = fill(vol, 8)
    manifest = snapcore.checkpoint(policy=dm_policy(write_policy, vol.mount_point), state_dir=state_dir)
    vol.write("after.txt", "written after the checkpoint\n")
    (vol.mount_point / "top.txt").unlink()
    os.sync()
    command = [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "restore", manifest.id, "--in-place"]
    # in use: LVM would only schedule the merge for the next activation, and a
    # restored program would start on the old tree; refused, nothing changed
    with open(vol.mount_point / "after.txt") as busy:
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        assert out.returncode == 1, out.stdout
        assert f"pid {os.getpid()} (" in out.stderr and "nothing was changed" in out.stderr, out.stderr
        assert busy.read() == "written after the checkpoint\n"
    assert devices.find_lv(VG, f"{vol.lv}-snapcore-{manifest.id}") is not None
    # not in use: unmounted, merged, mounted again, the old tree shows at once
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "mounted again" in out.stdout
    assert os.path.ismount(vol.mount_point)
    assert describe_tree(vol.mount_point, skip=LOST_FOUND) == before
    assert devices.find_lv(VG, f"{vol.lv}-snapcore-{manifest.id}") is None


def test_merge_restore_unmounted_is_immediate(volume: VolumeFactory, write_policy: Any, state_dir: Path) -> None:
    vol = volume("thick", "ext4", size_mb=64)
    before = fill(vol, 4)
    manifest = snapcore.checkpoint(policy=dm_policy(write_policy, vol.mount_point), state_dir=state_dir)
    vol.write("after.txt", "x")
    os.sync()
    vol.unmount()
    (rec,) = manifest.targets
    target = target_of(manifest, rec, state_dir)
    message = make_plugins().restore("dm", target, image_of(rec), None, None, True).message
    assert "rolled back" in message
    vol.mount()
    assert describe_tree(vol.mount_point, skip=LOST_FOUND) == before


@pytest.fixture
def raw_origin(tmp_path: Path) -> Any:
    """A plain dm linear device (not LVM) with ext4, and a spare COW device."""
    data, cow = make_loop("raw-data", 64), make_loop("raw-cow", 32)
    name = "rawsc"
    sectors = 64 << 11
    sh("dmsetup", "create", name, "--table", f"0 {sectors} linear {data.device} 0")
    mnt = tmp_path / "raw"
    mnt.mkdir()
    sh("mkfs.ext4", "-q", f"/dev/mapper/{name}")
    sh("mount", f"/dev/mapper/{name}", str(mnt))
    try:
        yield name, mnt, cow.device
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        for dev in sh("dmsetup", "ls").split("\n"):
            if dev.startswith(f"{name}-snapcore-"):
                subprocess.run(["dmsetup", "remove", dev.split()[0]], capture_output=True, check=False)
        subprocess.run(["dmsetup", "remove", name], capture_output=True, check=False)
        subprocess.run(["dmsetup", "remove", f"{name}-sc-real"], capture_output=True, check=False)
        drop_loop(cow)
        drop_loop(data)


def test_raw_dm_snapshot_discard_and_merge(raw_origin: Any, write_policy: Any, state_dir: Path) -> None:
    name, mnt, cow = raw_origin
    table_before = sh("dmsetup", "table", name)
    for i in range(5):
        (mnt / f"f{i}").write_bytes(os.urandom(5000))
    os.sync()
    before = describe_tree(mnt, skip=LOST_FOUND)
    support = backend.probe(find_mount(mnt))
    assert support.ok and "raw dm device" in support.reason
    # without a COW device: a clear error, the origin untouched
    with pytest.raises(CheckpointFailed, match="cow_device"):
        snapcore.checkpoint(policy=dm_policy(write_policy, mnt), state_dir=state_dir)
    assert sh("dmsetup", "table", name) == table_before
    policy = dm_policy(
        write_policy, mnt, f"    exporter: null\n    options:\n      dm: {{cow_device: {cow}, mount: true}}\n"
    )
    seen: dict[str, Any] = {}

    def payload(cp: Checkpoint) -> int:
        path = backend.image_mount_dir(cp.id, str(mnt))
        (mnt / "f0").write_bytes(b"changed")
        os.sync()
        seen["tree"] = describe_tree(path, skip=LOST_FOUND)
        return 0

    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, payload=payload)
    assert seen["tree"] == before
    (rec,) = manifest.targets
    assert rec.image == f"dm:{name}-snapcore-{manifest.id}" and rec.consistency == "atomic"
    assert "snapshot-origin" in sh("dmsetup", "table", name)
    entries = hooks.snapcore_list_images(find_mount(mnt))
    assert [e.ref for e in entries] == [rec.image]
    assert main(["--state-dir", str(state_dir), "verify", manifest.id]) == 0
    # in place: refused while mounted, then merged
    target = target_of(manifest, rec, state_dir)
    image = image_of(rec)
    assert image is not None
    with pytest.raises(snapcore.BackendError, match="in use"):
        hooks.snapcore_restore(target, image, None, None, True)
    sh("umount", str(mnt))
    assert "rolled back" in hooks.snapcore_restore(target, image, None, None, True)
    assert sh("dmsetup", "table", name) == table_before
    sh("mount", f"/dev/mapper/{name}", str(mnt))
    assert describe_tree(mnt, skip=LOST_FOUND) == before
    # a second snapshot, discarded: the origin's own table comes back
    manifest = snapcore.checkpoint(
        policy=dm_policy(write_policy, mnt, f"    options:\n      dm: {{cow_device: {cow}}}\n"), state_dir=state_dir
    )
    (rec,) = manifest.targets
    image = image_of(rec)
    assert image is not None
    hooks.snapcore_discard(target_of(manifest, rec, state_dir), image, None)
    assert sh("dmsetup", "table", name) == table_before
    assert hooks.snapcore_list_images(find_mount(mnt)) == []


def test_dm_fsfreeze_btrfs_in_one_checkpoint(
    volume: VolumeFactory, loop_fs: Any, write_policy: Any, state_dir: Path
) -> None:
    if not installed("btrfs"):
        pytest.skip("the btrfs backend (plugins/btrfs) is not installed")
    dmvol = volume("thick", "ext4", size_mb=64)
    before = fill(dmvol, 4)
    xfs = loop_fs("ext4")
    xfs.write("a.txt", "fsfreeze target\n")
    btr = loop_fs("btrfs")
    btr.write("b.txt", "btrfs target\n")
    policy = write_policy(
        f"""version: 1
mounts:
  {dmvol.mount_point}:
    imager: dm
  {xfs.mount_point}:
    imager: fsfreeze
  {btr.mount_point}:
    imager: btrfs
"""
    )
    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir)
    by = {t.mount: t for t in manifest.targets}
    assert manifest.outcome == "ok"
    assert by[str(dmvol.mount_point)].imager == "dm" and by[str(dmvol.mount_point)].consistency == "atomic"
    assert by[str(btr.mount_point)].imager == "btrfs"
    assert by[str(xfs.mount_point)].imager == "fsfreeze"
    assert describe_tree(dmvol.mount_point, skip=LOST_FOUND) == before
    for path in (dmvol.mount_point, xfs.mount_point, btr.mount_point):
        (Path(path) / "after").write_text("not frozen\n")


def test_dm_with_tar_exporter(volume: VolumeFactory, write_policy: Any, state_dir: Path, tmp_path: Path) -> None:
    if not installed("tar"):
        pytest.skip("the tar exporter (plugins/tar) is not installed")
    vol = volume("thin", "xfs")
    before = fill(vol, 6)
    dest = tmp_path / "exports"
    dest.mkdir()
    policy = dm_policy(write_policy, vol.mount_point, f"    exporter: tar\n    options:\n      tar: {{dest: {dest}}}\n")

    def payload(cp: Checkpoint) -> int:
        vol.write("top.txt", "changed after the snapshot\n")
        return 0

    manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, payload=payload)
    (rec,) = manifest.targets
    assert rec.exporter == "tar" and rec.export
    image = Image.from_json(rec.image_record or {})
    assert image.path and not os.path.ismount(image.path)  # unmounted after the export
    out = tmp_path / "untar"
    out.mkdir()
    where = Path(rec.export)
    candidates = [where] if where.is_file() else sorted(p for p in dest.rglob("*") if p.is_file())
    archives = [p for p in candidates if ".tar" in p.name and not p.name.endswith((".sha256", ".json"))]
    assert archives, candidates
    subprocess.run(["tar", "-xf", str(archives[0]), "-C", str(out)], check=True)
    got = describe_tree(out, skip=LOST_FOUND)
    assert {k: v for k, v in got.items() if k in before} == before
