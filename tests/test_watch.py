"""snapcore.tasks.changes: real files held by real processes, changed by real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapcore.tasks.changes import Change, ChangeKind, ChangeWatch, apply_changes
from snapcore.tasks.inventory import FileState, Inventory, take_inventory
from snapcore.testing import LoopFactory, Pace, machine_pace
from snapcore.testing.processes import Holders
from tests.test_inventory import content

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify and other tasks' /proc need root")


def writer(code: str, *args: str) -> int:
    """Run a small Python program to completion; returns its PID (the writer)."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.DEVNULL)
    assert proc.wait(machine_pace().seconds(30)) == 0
    return proc.pid


def settle(watch: ChangeWatch, kinds: set[ChangeKind], timeout: float = 5.0) -> tuple[Change, ...]:
    """Results once every kind in ``kinds`` showed up (or the timeout passed)."""
    deadline = time.monotonic() + machine_pace().seconds(timeout)
    while True:
        changes = watch.results()
        if kinds <= {c.kind for c in changes} or time.monotonic() > deadline:
            return changes
        time.sleep(0.01)


def watched(holder: Holders, *specs: str) -> tuple[Inventory, ChangeWatch]:
    pid = holder(*specs)
    inv = take_inventory([pid])
    watch = ChangeWatch(inv)
    watch.start()
    return inv, watch


def test_modified_after_start(holder: Holders, tmp_path: Path) -> None:
    f = tmp_path / "data.txt"
    f.write_text("before")
    _inv, watch = watched(holder, f"r:{f}")
    try:
        pid = writer("import sys; open(sys.argv[1], 'a').write(' and after')", str(f))
        changes = settle(watch, {ChangeKind.MODIFY})
    finally:
        watch.stop()
    (change,) = [c for c in changes if c.path == str(f)]
    assert change.kind is ChangeKind.MODIFY and change.ino == f.stat().st_ino
    assert "size 6 -> 16" in change.detail
    if watch.fanotify_marks:
        assert change.pid == pid, change  # fanotify names the writer
    assert change.to_json()["kind"] == "modify"


def test_truncated(holder: Holders, tmp_path: Path) -> None:
    f = tmp_path / "log.bin"
    f.write_bytes(content(10_000))
    _inv, watch = watched(holder, f"a:{f}")
    with watch:
        os.truncate(f, 100)
        changes = settle(watch, {ChangeKind.TRUNCATE})
    assert [c.kind for c in changes if c.path == str(f)] == [ChangeKind.TRUNCATE]
    assert "10000 -> 100" in changes[0].detail


def test_deleted_renamed_renamed_over(holder: Holders, tmp_path: Path) -> None:
    doomed, moved, victim = (tmp_path / n for n in ("doomed", "moved", "victim"))
    for p in (doomed, moved, victim):
        p.write_text(p.name)
    inv, watch = watched(holder, f"r:{doomed}", f"r:{moved}", f"r:{victim}")
    with watch:
        doomed.unlink()
        moved.rename(tmp_path / "moved-away")
        (tmp_path / "intruder").write_text("intruder")
        (tmp_path / "intruder").rename(victim)
        changes = settle(watch, {ChangeKind.DELETE, ChangeKind.RENAME, ChangeKind.RENAME_OVER})
    by_path = {c.path: c for c in changes}
    assert set(by_path) == {str(doomed), str(moved), str(victim)}, changes
    assert by_path[str(doomed)].kind is ChangeKind.DELETE
    assert by_path[str(moved)].kind is ChangeKind.RENAME
    assert by_path[str(moved)].detail == f"now at {tmp_path / 'moved-away'}"
    assert by_path[str(victim)].kind is ChangeKind.RENAME_OVER
    # the manifest's states follow the watch
    states = {f.path: f.state for f in apply_changes(inv, changes).files}
    assert states[str(doomed)] is FileState.DELETED
    assert states[str(moved)] is FileState.RENAMED
    assert states[str(victim)] is FileState.RENAMED_OVER


def test_mapped_then_deleted(holder: Holders, tmp_path: Path) -> None:
    lib = tmp_path / "lib.bin"
    lib.write_bytes(content(4096))
    inv, watch = watched(holder, f"m:{lib}")
    with watch:
        lib.unlink()
        changes = settle(watch, {ChangeKind.DELETE})
    assert [(c.kind, c.path) for c in changes] == [(ChangeKind.DELETE, str(lib))]
    assert apply_changes(inv, changes).ghosts_needed[0].path == str(lib)


def test_hard_link_and_deleted_open_file(holder: Holders, tmp_path: Path, pace: Pace) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = tmp_path / "a" / "file"
    a.write_text("linked")
    other = tmp_path / "b" / "link"
    os.link(a, other)
    ghost = tmp_path / "ghost"
    ghost.write_text("deleted but open")
    pid = holder(f"r:{a}", f"w:{ghost}")
    ghost.unlink()
    inv = take_inventory([pid])
    with ChangeWatch(inv) as watch:
        # written through a name in a directory nobody watches
        with open(other, "a") as f:
            f.write(" and changed")
        # written through the task's own descriptor of the deleted file
        fd_path = next(u for f in inv.files if f.path == str(ghost) for u in f.uses)
        with open(f"/proc/{fd_path.pid}/fd/{fd_path.fd}", "a") as f:
            f.write(" and changed")
        changes = settle(watch, {ChangeKind.MODIFY})
        time.sleep(pace.seconds(0.05))
        changes = watch.results()
    assert {(c.kind, c.path) for c in changes} == {(ChangeKind.MODIFY, str(a)), (ChangeKind.MODIFY, str(ghost))}


def test_nested_mount(loop_fs: LoopFactory, holder: Holders, tmp_path: Path) -> None:
    fs = loop_fs("ext4", mount_point=tmp_path / "nested")
    inner = fs.write("inner.txt", "on the loop filesystem")
    _inv, watch = watched(holder, f"r:{inner}")
    with watch:
        dev = inner.stat().st_dev
        if watch.fanotify_marks:
            assert f"{os.major(dev)}:{os.minor(dev)}" in watch.fanotify_marks
        pid = writer("import sys; open(sys.argv[1], 'w').write('rewritten, longer than before')", str(inner))
        changes = settle(watch, {ChangeKind.MODIFY})
    # opened with O_TRUNC then written: a truncation, then a write; both reported
    assert {c.kind for c in changes} <= {ChangeKind.MODIFY, ChangeKind.TRUNCATE}
    assert changes and all(c.path == str(inner) for c in changes)
    if watch.fanotify_marks:
        assert any(c.pid == pid for c in changes)


def test_idle_tree_of_10k_files_raises_no_alarm(holder: Holders, tmp_path: Path, pace: Pace) -> None:
    tree = tmp_path / "tree"
    specs = []
    for d in range(100):
        sub = tree / f"d{d:02d}"
        sub.mkdir(parents=True)
        for i in range(100):
            p = sub / f"f{i:02d}"
            p.write_bytes(b"idle %d\n" % i)
            specs.append(f"r:{p}")
    pid = holder(*specs)
    inv = take_inventory([pid])
    assert len([f for f in inv.files if f.path.startswith(str(tree))]) == 10_000
    with ChangeWatch(inv) as watch:
        assert watch.inotify_watches >= 10_000 and not [w for w in watch.warnings if "inotify" in w]
        # reads, and changes to files nobody needs, in the same directories
        subprocess.run(["cat", *(str(tree / "d00" / f"f{i:02d}") for i in range(100))], check=True, capture_output=True)
        for d in range(0, 100, 10):
            junk = tree / f"d{d:02d}" / "junk"
            junk.write_text("unrelated")
            junk.rename(tree / f"d{d:02d}" / "junk2")
            (tree / f"d{d:02d}" / "junk2").unlink()
        time.sleep(pace.seconds(0.3))
        assert watch.results() == ()
    assert watch.stop() == ()


def test_since_and_stop(holder: Holders, tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_text("x")
    _inv, watch = watched(holder, f"r:{f}")
    with open(f, "a") as out:
        out.write("early")
    settle(watch, {ChangeKind.MODIFY})
    mark = time.monotonic()
    assert watch.results(since=mark) == ()
    final = watch.stop()
    assert [c.kind for c in final] == [ChangeKind.MODIFY]
    assert watch.stop() == final  # idempotent
    with open(f, "a") as out:
        out.write("after the stop")
    assert watch.results() == final


def test_inotify_only(holder: Holders, tmp_path: Path) -> None:
    f = tmp_path / "y"
    f.write_text("y")
    pid = holder(f"r:{f}")
    with ChangeWatch(take_inventory([pid]), fanotify=False, thread=False) as watch:
        assert watch.fanotify_marks == []
        with open(f, "a") as out:
            out.write("more")
        changes = watch.results()
    assert [(c.kind, c.source, c.pid) for c in changes] == [(ChangeKind.MODIFY, "inotify", None)]
