"""snapcore.tasks.openhold: write opens of needed files held back or refused, with
real fanotify permission events and real openers that are no descendants of ours."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcore.tasks import openhold
from snapcore.tasks.openhold import HoldFile, HoldMode, OpenHold, describe_flags, writes
from snapcore.testing import Pace
from snapcore.testing.processes import Stranger, start_stranger

pytestmark = pytest.mark.usefixtures("root_only")

WRITES = ["append", "rdwr", "trunc-ro", "creat", "openat2-write"]


class Openers:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[Stranger] = []

    def __call__(self, path: Path | str, how: str, wrap: tuple[str, ...] = ()) -> Stranger:
        stranger = start_stranger(path, how, self.base / f"opener-{len(self.started)}", wrap)
        self.started.append(stranger)
        return stranger


@pytest.fixture
def opener(tmp_path: Path) -> Iterator[Openers]:
    openers = Openers(tmp_path)
    try:
        yield openers
    finally:
        for stranger in openers.started:
            stranger.kill()


def hold_of(mode: HoldMode, *paths: Path, limit_s: float = 60.0) -> OpenHold:
    files = []
    for path in paths:
        st = path.stat()
        files.append(HoldFile(path=str(path), dev=st.st_dev, ino=st.st_ino, via=str(path), mode=mode))
    return OpenHold(files, limit_s=limit_s)


@pytest.fixture
def needed(tmp_path: Path) -> Path:
    path = tmp_path / "needed.db"
    path.write_bytes(b"as checkpointed\n")
    return path


def test_flags() -> None:
    assert writes(os.O_WRONLY) and writes(os.O_RDWR | os.O_CREAT) and writes(os.O_RDONLY | os.O_TRUNC)
    assert not writes(os.O_RDONLY) and not writes(os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    assert describe_flags(os.O_WRONLY | os.O_APPEND | os.O_CREAT) == "O_WRONLY|O_APPEND|O_CREAT"


def test_delay_holds_every_kind_of_write_open_until_the_release(
    needed: Path, tmp_path: Path, opener: Openers, pace: Pace
) -> None:
    other = tmp_path / "unrelated.log"
    other.write_text("")
    link = tmp_path / "link-to-needed"
    os.link(needed, link)
    hold = hold_of(HoldMode.DELAY, needed)
    hold.start()
    try:
        hold.engage()
        held = {how: opener(link if how == "rdwr" else needed, how) for how in WRITES}  # a hard link's name too
        for stranger in held.values():
            stranger.wait_blocked(10)
        # reads of the needed file, and writes of any other, are answered at once
        for how in ("read", "openat2-read"):
            assert opener(needed, how).result(10)["result"] == "ok"
        assert opener(other, "append").result(10)["result"] == "ok"
        assert all(s.blocked() for s in held.values()), "a held open went before the release"
        assert needed.read_bytes() == b"as checkpointed\n"
    finally:
        records = hold.release()
    for stranger in held.values():
        assert stranger.result(10)["result"] == "ok"
    assert hold._child is None  # the answering process reported and was reaped
    by_flags = {r.flags: r for r in records}
    assert set(by_flags) == {
        "O_WRONLY|O_APPEND (openat)",
        "O_RDWR (openat)",
        "O_RDONLY|O_TRUNC (openat)",
        "O_WRONLY|O_CREAT|O_TRUNC (creat)",
        "O_WRONLY|O_APPEND (openat2)",
    }, records
    for record in records:
        assert record.action == "delayed" and record.released == "thaw" and record.held_ms > 0
        assert record.path == str(needed) and record.command.startswith("python")
        assert record.pid == record.tid and record.pid in {s.pid for s in held.values()}
        json_ = record.to_json()
        assert json_["device"] == f"{os.major(record.dev)}:{os.minor(record.dev)}" and json_["action"] == "delayed"


def test_deny_refuses_write_opens_with_eperm(needed: Path, opener: Openers) -> None:
    hold = hold_of(HoldMode.DENY, needed)
    hold.start()
    try:
        hold.engage()
        results = {how: opener(needed, how).result(10)["result"] for how in WRITES}
        assert opener(needed, "read").result(10)["result"] == "ok"
    finally:
        records = hold.release()
    assert results == dict.fromkeys(WRITES, "EPERM")
    assert needed.read_bytes() == b"as checkpointed\n"
    assert [r.action for r in records] == ["denied"] * len(WRITES)


def test_nothing_is_held_before_engage_or_after_release(needed: Path, opener: Openers) -> None:
    hold = hold_of(HoldMode.DENY, needed)
    hold.start()
    try:
        assert opener(needed, "append").result(10)["result"] == "ok"
    finally:
        assert hold.release() == []
    assert hold.asked == 1  # asked, and allowed: the tasks still ran
    assert opener(needed, "append").result(10)["result"] == "ok"


def test_unrelated_files_are_never_asked_about(needed: Path, tmp_path: Path) -> None:
    """Inode marks: opens of other files on the same filesystem never reach the hold."""
    others = [tmp_path / f"other-{i}" for i in range(50)]
    for path in others:
        path.write_text("x")
    hold = hold_of(HoldMode.DELAY, needed)
    hold.start()
    try:
        hold.engage()
        subprocess.run(["sh", "-c", " ".join(f"echo y >> {p};" for p in others)], check=True)
    finally:
        hold.release()
    assert hold.asked == 0


def test_holding_ends_at_the_limit(needed: Path, opener: Openers) -> None:
    """``limit_s`` after ``engage`` every held open goes, and nothing more is held."""
    hold = hold_of(HoldMode.DELAY, needed, limit_s=0.5)
    hold.start()
    try:
        hold.engage()
        first = opener(needed, "append")
        assert first.result(10)["result"] == "ok"  # not waiting for the release
        assert opener(needed, "append").result(10)["result"] == "ok"
    finally:
        hold.release()
    assert [h.released for h in hold.held] == ["deadline"]


def test_an_opener_killed_while_held(needed: Path, opener: Openers) -> None:
    hold = hold_of(HoldMode.DELAY, needed)
    hold.start()
    try:
        hold.engage()
        stranger = opener(needed, "append")
        stranger.wait_blocked(10)
        stranger.kill()  # the kernel drops its event: our late answer finds none
    finally:
        records = hold.release()
    assert hold.failure is None and [r.released for r in records] == ["thaw"]
    assert opener(needed, "append").result(10)["result"] == "ok"


def test_an_answering_process_killed_while_holding(needed: Path, opener: Openers) -> None:
    """Its held opens go when the group's last descriptor closes (the release here;
    in a checkpoint the guard's copy also ends at the hold's end)."""
    hold = hold_of(HoldMode.DELAY, needed)
    hold.start()
    try:
        hold.engage()
        stranger = opener(needed, "append")
        stranger.wait_blocked(10)
        assert hold._child is not None
        os.kill(hold._child, signal.SIGKILL)
        assert stranger.blocked()
    finally:
        hold.release()
    assert stranger.result(10)["result"] == "ok"
    assert any("did not report" in w for w in hold.warnings)


def test_our_own_and_our_childrens_write_opens_are_not_held(needed: Path) -> None:
    """The controller and its payload (``criu dump``) are part of the checkpoint:
    holding them would stall it (the change watch judges what they write)."""
    hold = hold_of(HoldMode.DENY, needed)
    hold.start()
    try:
        hold.engage()
        with open(needed, "a") as f:
            f.write("ours\n")
        subprocess.run(["sh", "-c", f"echo child >> {needed}"], check=True)
    finally:
        hold.release()
    assert hold.asked == 2 and hold.held == []


def test_held_through_another_mount_namespace_s_bind_mount(needed: Path, tmp_path: Path, opener: Openers) -> None:
    """The mark is on the inode: a container's path to the same file is held too."""
    alias = tmp_path / "alias"
    alias.mkdir()
    wrap = ("unshare", "-m", "sh", "-c", f'mount --bind {needed.parent} {alias} && exec "$@"', "sh")
    hold = hold_of(HoldMode.DELAY, needed)
    hold.start()
    try:
        hold.engage()
        stranger = opener(alias / needed.name, "append", wrap=wrap)
        stranger.wait_blocked(10)
    finally:
        records = hold.release()
    assert stranger.result(10)["result"] == "ok"
    assert [r.path for r in records] == [str(needed)]


def test_an_internal_error_allows_and_turns_the_hold_off_FAKE_BROKEN_FLAGS_READER(
    needed: Path, opener: Openers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fake: reading the opener's flags raises (no real failure of it can be
    caused on demand). The open is allowed, and every later one too."""

    def broken(tid: int) -> tuple[int | None, str]:
        raise RuntimeError("cannot read the flags")

    monkeypatch.setattr(openhold, "opener_flags", broken)
    hold = hold_of(HoldMode.DENY, needed)
    hold.start()
    try:
        hold.engage()
        assert opener(needed, "append").result(10)["result"] == "ok"
        assert opener(needed, "append").result(10)["result"] == "ok"
    finally:
        hold.release()
    assert hold.failure == "RuntimeError: cannot read the flags"


def test_where_fanotify_cannot_mark_it_says_so(tmp_path: Path) -> None:
    hold = OpenHold([HoldFile(path="/gone", dev=1, ino=1, via=str(tmp_path / "gone"), mode=HoldMode.DELAY)], limit_s=1)
    hold.start()
    assert hold.descriptor is None and hold.warnings == ["cannot hold write opens of /gone: No such file or directory"]
    assert hold.release() == []


def test_opener_flags_of_a_thread_in_no_open_call() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        flags, how = openhold.opener_flags(proc.pid)
        assert flags is None and how.startswith("unknown")
    finally:
        proc.kill()
        proc.wait()
    assert openhold.opener_flags(proc.pid)[0] is None  # gone
