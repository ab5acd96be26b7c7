"""snapcore.tasks.inventory with real processes holding real files."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest

from snapcore.host.mounts import mount_id_of
from snapcore.tasks.inventory import (
    FileState,
    Inventory,
    OpenFile,
    UseKind,
    copy_ghosts,
    take_inventory,
)
from snapcore.testing import LoopFactory
from snapcore.testing.processes import Holders

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="map_files and other tasks' fdinfo need root")


def content(n: int, seed: int = 1) -> bytes:
    return bytes((i * 131 + seed * 7 + i // 251) % 256 for i in range(n))


def one(inv: Inventory, path: str | Path) -> OpenFile:
    found = [f for f in inv.files if f.path == str(path) or str(path) in f.other_paths]
    assert len(found) == 1, [f.path for f in inv.files]
    return found[0]


def test_present_file_flags_position_and_mount(holder: Holders, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(content(1000))
    log = tmp_path / "log.txt"
    log.write_text("x")
    pid = holder(f"r:{data}", f"a:{log}", f"cwd:{tmp_path}")
    inv = take_inventory([pid])
    f = one(inv, data)
    st = data.stat()
    assert (f.dev, f.ino, f.size, f.mtime_ns) == (st.st_dev, st.st_ino, 1000, st.st_mtime_ns)
    assert f.state is FileState.PRESENT and not f.mapped and f.kind == "file"
    assert f.mount_id == mount_id_of(data)
    (use,) = f.uses
    assert use.kind is UseKind.FD and use.pid == pid and use.pos == 3
    assert use.flags is not None and use.flags & os.O_ACCMODE == os.O_RDONLY
    a = one(inv, log)
    assert a.uses[0].flags is not None and a.uses[0].flags & os.O_APPEND
    cwd = one(inv, tmp_path)
    assert cwd.kind == "dir" and any(u.kind is UseKind.CWD for u in cwd.uses)
    # the interpreter is mapped; /dev/null (stdin, devtmpfs) is a pseudo filesystem
    assert any(f.mapped and f.kind == "file" for f in inv.files)
    assert not any(f.path == "/dev/null" for f in inv.files) and inv.skipped >= 1
    assert f.mount_id in {m.mount_id for m in inv.mounts}
    record = f.to_json()
    assert record["path"] == str(data) and record["state"] == "present" and record["deleted"] is False
    assert record["pos"] == 3 and record["device"] == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    assert record["inode"] == st.st_ino and record["ghost"] is None


def test_deleted_while_open_gets_a_byte_exact_ghost(holder: Holders, tmp_path: Path) -> None:
    doomed = tmp_path / "doomed.bin"
    payload = content(300_000, seed=3)
    doomed.write_bytes(payload)
    pid = holder(f"w:{doomed}")
    doomed.unlink()
    inv = take_inventory([pid], ghost_dir=tmp_path / "ghosts")
    f = one(inv, doomed)
    assert f.state is FileState.DELETED and f.nlink == 0 and f.needs_ghost
    assert f.ghost is not None and f.ghost.path is not None and f.ghost.size == len(payload)
    assert Path(f.ghost.path).read_bytes() == payload
    assert f.to_json()["deleted"] is True and f.to_json()["ghost"]["sha256"]


def test_renamed_and_renamed_over(holder: Holders, tmp_path: Path) -> None:
    moved = tmp_path / "moved.txt"
    moved.write_text("moved")
    victim = tmp_path / "victim.txt"
    original = content(5000, seed=5)
    victim.write_bytes(original)
    pid = holder(f"r:{moved}", f"r:{victim}")
    moved.rename(tmp_path / "moved-away.txt")
    newcomer = tmp_path / "newcomer.txt"
    newcomer.write_text("not the file the task opened")
    newcomer.rename(victim)
    inv = take_inventory([pid], ghost_dir=tmp_path / "ghosts")
    # the kernel follows a rename: the file is where it went, and still present
    assert one(inv, tmp_path / "moved-away.txt").state is FileState.PRESENT
    over = one(inv, victim)
    assert over.state is FileState.RENAMED_OVER
    assert over.ghost is not None and over.ghost.path is not None
    assert Path(over.ghost.path).read_bytes() == original
    assert victim.read_text() == "not the file the task opened"


def test_mapped_then_deleted(holder: Holders, tmp_path: Path) -> None:
    lib = tmp_path / "mapped.bin"
    payload = content(8192 * 3, seed=9)
    lib.write_bytes(payload)
    pid = holder(f"m:{lib}")
    lib.unlink()
    inv = take_inventory([pid])
    f = one(inv, lib)
    assert f.mapped and f.state is FileState.DELETED
    assert all(u.kind is UseKind.MAP for u in f.uses) and f.uses[0].mapping
    assert "/map_files/" in f.via
    inv = copy_ghosts(inv, tmp_path / "ghosts")
    ghost = one(inv, lib).ghost
    assert ghost is not None and ghost.path is not None
    assert Path(ghost.path).read_bytes() == payload


def test_hard_links(holder: Holders, tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    a.write_text("shared inode")
    b = tmp_path / "b.txt"
    os.link(a, b)
    pid = holder(f"r:{a}", f"r:{b}")
    inv = take_inventory([pid])
    f = one(inv, a)
    assert f.nlink == 2 and len(f.uses) == 2 and f.state is FileState.PRESENT
    assert {f.path, *f.other_paths} == {str(a), str(b)}
    # one name unlinked: the other still names the inode
    a.unlink()
    f = one(take_inventory([pid]), b)
    assert f.path == str(b) and f.state is FileState.PRESENT and f.nlink == 1
    # opened only through a name that is then unlinked: deleted, though still linked
    c = tmp_path / "c.txt"
    c.write_text("only c")
    pid2 = holder(f"r:{c}")
    os.link(c, tmp_path / "d.txt")
    c.unlink()
    g = one(take_inventory([pid2], ghost_dir=tmp_path / "ghosts"), c)
    assert g.state is FileState.DELETED and g.nlink == 1
    assert g.ghost is not None and g.ghost.path is not None and Path(g.ghost.path).read_text() == "only c"


def test_nested_mount(loop_fs: LoopFactory, holder: Holders, tmp_path: Path) -> None:
    # loop_fs first: it is torn down last, after the holder let go of its files
    fs = loop_fs("ext4", mount_point=tmp_path / "nested")
    inner = fs.write("dir/inner.txt", "on the loop filesystem")
    outer = tmp_path / "outer.txt"
    outer.write_text("on the outer filesystem")
    pid = holder(f"r:{inner}", f"r:{outer}")
    inv = take_inventory([pid])
    f = one(inv, inner)
    assert f.mount_point == str(fs.mount_point) and f.fstype == "ext4"
    assert f.mount_id == mount_id_of(fs.mount_point)
    assert one(inv, outer).mount_id != f.mount_id
    assert str(fs.mount_point) in {m.mount_point for m in inv.mounts}


def test_ghost_limit(holder: Holders, tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        p = tmp_path / f"big{i}.bin"
        p.write_bytes(content(40_000, seed=i))
        paths.append(p)
    pid = holder(*(f"r:{p}" for p in paths))
    for p in paths:
        p.unlink()
    inv = take_inventory([pid], ghost_dir=tmp_path / "ghosts", ghost_limit=100_000)
    ghosts = [one(inv, p).ghost for p in paths]
    copied = [g for g in ghosts if g is not None and g.path is not None]
    skipped = [g for g in ghosts if g is not None and g.path is None]
    assert len(copied) == 2 and len(skipped) == 1
    assert skipped[0].note and "ghost_limit" in skipped[0].note
    assert any("ghost_limit" in w for w in inv.warnings)


def test_exited_task_is_a_warning(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    inv = take_inventory([proc.pid])
    assert inv.files == () and inv.warnings and "exited" in inv.warnings[0]


def test_many_files(holder: Holders, tmp_path: Path) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low")
    tree = tmp_path / "tree"
    tree.mkdir()
    specs = []
    for i in range(1000):
        p = tree / f"f{i:04d}"
        p.write_bytes(b"x" * (i % 7))
        specs.append(f"r:{p}")
    pid = holder(*specs)
    inv = take_inventory([pid])
    assert len([f for f in inv.files if f.path.startswith(str(tree))]) == 1000


def test_inventory_of_a_running_tree_whose_children_come_and_go(tmp_path: Path) -> None:
    """The inventory of running tasks (``--pid`` before the freeze, ``--container``'s
    rehearsal) races their children: a descriptor closed, a process gone between
    listing and reading. Seen for real: the fdinfo file of a closed descriptor opened,
    then ENOENT on read. Whatever vanishes is skipped, never an exception."""
    from snapcore.host.mounts import MountTable
    from snapcore.tasks.resolve import resolve_pid

    out = tmp_path / "out"
    churn = subprocess.Popen(
        ["sh", "-c", f'while :; do sh -c "exec 3</etc/passwd 4>{out}; /bin/true; cat /etc/hostname >/dev/null"; done']
    )
    try:
        for _ in range(3000):  # ~0.5% of runs failed before: some 15 failures expected
            take_inventory(resolve_pid(churn.pid).pids, table=MountTable.read())
    finally:
        churn.kill()
        churn.wait()
