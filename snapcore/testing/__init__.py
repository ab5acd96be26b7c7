"""pytest fixtures for snapcore and its backends (opt-in: ``-p snapcore.testing``).

* ``loop_fs``: a factory that makes a loop-backed ext4, xfs or btrfs filesystem in
  a temporary directory and tears it down however the test ends (thaw, unmount,
  detach the loop device, delete the image).
* ``state_dir``: a private snapcore state directory; ``write_policy``: writes a
  policy file for the test.
* ``hook_recorder``: records every hook call a plugin manager makes.
* :func:`start_write` / :class:`WriteProbe`: a write in a subprocess, to see whether
  a filesystem is frozen without ever blocking the test itself.
* :func:`describe_tree` / :func:`assert_same_tree`: a tree as a comparable value
  (:mod:`snapcore.testing.trees`).
* ``pace`` / :func:`machine_pace`: how fast this machine is, measured once per run
  (a bare interpreter start), so that every time a test allows (a freeze deadline,
  a wait for a guard or a daemon) scales with the machine instead of being a
  constant tuned on a fast one. Printed in the report header.

Tests never freeze or snapshot a filesystem they did not create.

This module is the pytest plugin (fixtures, hooks) and re-exports the helpers, which
live in :mod:`.pace`, :mod:`.probes`, :mod:`.trees`, :mod:`.processes` and, for the
test VM, :mod:`.vm`, :mod:`.vmprogress` and :mod:`.vmreport`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import snapcore
from snapcore.policy import DEFAULT_FREEZE_TIMEOUT as _DEFAULT_FREEZE_TIMEOUT
from snapcore.safety.guard import FITHAW as FITHAW
from snapcore.testing.pace import REFERENCE_START_S as REFERENCE_START_S
from snapcore.testing.pace import Pace as Pace
from snapcore.testing.pace import machine_pace as machine_pace
from snapcore.testing.pace import measure_python_start as measure_python_start
from snapcore.testing.probes import WriteProbe as WriteProbe
from snapcore.testing.probes import assert_not_frozen as assert_not_frozen
from snapcore.testing.probes import reap_probes as reap_probes
from snapcore.testing.probes import start_write as start_write
from snapcore.testing.probes import thaw_quietly as thaw_quietly
from snapcore.testing.probes import wait_for_path as wait_for_path
from snapcore.testing.trees import assert_same_tree as assert_same_tree
from snapcore.testing.trees import describe_tree as describe_tree


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "starts_early: moved to the front of the session (it starts a long run in the background)"
    )
    config.addinivalue_line("markers", "waits_late: moved to the end of the session (it waits for such a run)")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``starts_early`` go first and those marked ``waits_late`` last: the
    dm tests start their VM's guest run first, in a thread, and judge it last, so its
    ~12 minutes of emulated CPU overlap every host test (on the other CPU) instead of
    following them."""
    early = [item for item in items if item.get_closest_marker("starts_early")]
    late = [item for item in items if item.get_closest_marker("waits_late") and item not in early]
    rest = [item for item in items if item not in early and item not in late]
    items[:] = [*early, *rest, *late]


def pytest_report_header(config: pytest.Config) -> str:
    return "snapcore.testing pace: " + machine_pace().describe()


@pytest.fixture(scope="session")
def pace() -> Pace:
    """The machine's :class:`Pace`: ``pace.seconds(5)`` instead of a bare ``5``."""
    return machine_pace()


MKFS: dict[str, tuple[list[str], str, int]] = {
    # fstype: (mkfs command, Debian package, smallest size in MiB)
    "ext4": (["mkfs.ext4", "-q", "-F"], "e2fsprogs", 16),
    "ext2": (["mkfs.ext2", "-q", "-F"], "e2fsprogs", 16),
    "xfs": (["mkfs.xfs", "-q", "-f"], "xfsprogs", 300),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], "btrfs-progs", 128),
}


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def write_under(root: Path, relpath: str, data: bytes | str) -> Path:
    """Write ``data`` to ``root/relpath``, making the directories on the way."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@dataclass(slots=True)
class LoopFS:
    """A filesystem on a loop device that a test made (and will destroy)."""

    fstype: str
    image: Path
    device: str
    mount_point: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def __fspath__(self) -> str:
        return str(self.mount_point)

    def __str__(self) -> str:
        return str(self.mount_point)

    def write(self, relpath: str, data: bytes | str) -> Path:
        return write_under(self.mount_point, relpath, data)

    def mount_subvolume(self, name: str, where: Path) -> Path:
        """(btrfs) Create the subvolume ``name`` and mount it alone at ``where`` with
        ``subvol=`` (as a rollback in place needs), unmounted again on teardown."""
        _run(["btrfs", "-q", "subvolume", "create", str(self.mount_point / name)])
        where.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-o", f"subvol={name}", self.device, str(where)])
        self.cleanups.append(lambda: _unmount(where))
        return where


class LoopFactory:
    """Makes loop filesystems under one temporary directory; ``close`` undoes all."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.made: list[LoopFS] = []

    def __call__(
        self,
        fstype: str = "ext4",
        *,
        size_mb: int | None = None,
        mount_point: str | os.PathLike[str] | None = None,
        mkfs_args: tuple[str, ...] = (),
        mount_options: str | None = None,
    ) -> LoopFS:
        if os.geteuid() != 0:
            pytest.skip("loop filesystems need root")
        if fstype not in MKFS:
            raise ValueError(f"no mkfs recipe for {fstype!r}")
        mkfs, package, smallest = MKFS[fstype]
        if shutil.which(mkfs[0]) is None:
            pytest.skip(f"{mkfs[0]} is missing: apt-get install {package}")
        size = max(size_mb or smallest, smallest)
        name = f"{fstype}-{uuid.uuid4().hex[:8]}"
        image = self.base / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size << 20)
        mnt = Path(mount_point) if mount_point else self.base / name
        mnt.mkdir(parents=True, exist_ok=True)
        device = _run(["losetup", "--find", "--show", str(image)]).stdout.strip()
        fs = LoopFS(fstype=fstype, image=image, device=device, mount_point=mnt)
        self.made.append(fs)
        fs.cleanups.append(lambda: _detach(device))
        _run([*mkfs, *mkfs_args, device])
        cmd = ["mount", "-t", fstype]
        if mount_options:
            cmd += ["-o", mount_options]
        _run([*cmd, device, str(mnt)])
        fs.cleanups.append(lambda: _unmount(mnt))
        return fs

    def close(self) -> list[str]:
        """Tear down every filesystem, newest first; returns what went wrong."""
        problems: list[str] = []
        for fs in reversed(self.made):
            thaw_quietly(fs.mount_point)
        problems += reap_probes()
        for fs in reversed(self.made):
            for cleanup in reversed(fs.cleanups):
                try:
                    cleanup()
                except Exception as exc:
                    problems.append(f"{fs.mount_point}: {exc}")
            with contextlib.suppress(OSError):
                fs.image.unlink()
        self.made.clear()
        return problems


def _unmount(mnt: Path) -> None:
    # nested mounts made by a test go first; -R unmounts the whole tree
    for attempt in range(20):
        result = subprocess.run(["umount", "-R", str(mnt)], capture_output=True, text=True)
        if result.returncode == 0 or "not mounted" in result.stderr:
            return
        time.sleep(0.1 * (attempt + 1))
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _detach(device: str) -> None:
    for attempt in range(20):
        result = subprocess.run(["losetup", "-d", device], capture_output=True, text=True)
        if result.returncode == 0 or "No such device" in result.stderr:
            return
        time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"cannot detach {device}: {result.stderr.strip()}")


@pytest.fixture
def loop_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopFactory]:
    """Factory fixture: ``loop_fs("xfs")`` → a mounted :class:`LoopFS`, torn down after."""
    factory = LoopFactory(tmp_path_factory.mktemp("loopfs"))
    try:
        yield factory
    finally:
        problems = factory.close()
        if problems:
            pytest.fail("loop filesystem teardown: " + "; ".join(problems))


@pytest.fixture(autouse=True)
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test's own run directory (journal, locks, the guard's records), through
    ``SNAPCORE_RUN_DIR``: a test never reads or leaves anything in the host's
    ``/run/snapcore``, and crash records of one test never reach the next.

    Not through ``monkeypatch``: an autouse fixture that requests it makes it the
    first fixture set up, hence the last torn down, so a test's own ``monkeypatch``
    (a ``PATH`` without ``umount``, say) would still hold while its other fixtures'
    teardowns run."""
    path = tmp_path_factory.mktemp("run")
    path.chmod(0o700)
    before = os.environ.get("SNAPCORE_RUN_DIR")
    os.environ["SNAPCORE_RUN_DIR"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("SNAPCORE_RUN_DIR", None)
        else:
            os.environ["SNAPCORE_RUN_DIR"] = before


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A private state directory (manifests) for one test."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def plugins() -> snapcore.Plugins:
    """A fresh plugin manager with every installed backend (or those ``SNAPCORE_PLUGINS``
    names)."""
    return snapcore.make_plugins()


def plugins_named(*names: str) -> snapcore.Plugins:
    """A plugin manager with the core's backends and only these plugins (as
    ``SNAPCORE_PLUGINS=a,b``), whatever the environment says."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SNAPCORE_PLUGINS", ",".join(names))
        return snapcore.make_plugins()


WritePolicy = Callable[..., Path]


@pytest.fixture(scope="session")
def criu() -> Any:
    """A CRIU that passes ``criu check`` (:class:`snapcore.tasks.criu.Criu`: ``.path``),
    else the test is skipped, saying why."""
    if os.geteuid() != 0:
        pytest.skip("CRIU needs root")
    from snapcore.errors import CriuUnavailable
    from snapcore.tasks.criu import check_criu

    try:
        return check_criu()
    except CriuUnavailable as exc:
        pytest.skip(f"no working CRIU (run scripts/setup-criu.sh): {exc}")


@pytest.fixture
def write_policy(tmp_path: Path) -> WritePolicy:
    """Write a policy file under the test's directory and return its path:
    ``write_policy(text)`` or ``write_policy(text_or_bytes, name="p.yaml")``."""
    counter = iter(range(10_000))

    def write(text: str | bytes, name: str | None = None) -> Path:
        path = tmp_path / (name or f"policy-{next(counter)}.yaml")
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    return write


@dataclass(slots=True)
class HookCall:
    name: str
    plugins: list[str]
    kwargs: dict[str, Any]


class BeforeFreeze:
    """A plugin that runs ``action`` at ``snapcore_before_freeze``, keeping what it
    returns in ``result``: an application writing to its files between an exporter's
    pre-copy and the freeze. ``plugins.pm.register(BeforeFreeze(...))``."""

    def __init__(self, action: Callable[[], Any]) -> None:
        self.action = action
        self.result: Any = None

    @snapcore.hookimpl
    def snapcore_before_freeze(self, checkpoint: snapcore.Checkpoint) -> None:
        self.result = self.action()


class HookRecorder:
    """Records every hook call of a plugin manager (like pytester's HookRecorder)."""

    def __init__(self) -> None:
        self.calls: list[HookCall] = []
        self._undo: Callable[[], None] | None = None

    def attach(self, pm: Any) -> None:
        def before(hook_name: str, hook_impls: Any, kwargs: dict[str, Any]) -> None:
            self.calls.append(HookCall(hook_name, [i.plugin_name for i in hook_impls], dict(kwargs)))

        def after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: dict[str, Any]) -> None:
            return None

        self._undo = pm.add_hookcall_monitoring(before, after)

    def names(self, *, prefix: str = "snapcore_") -> list[str]:
        return [c.name[len(prefix) :] if c.name.startswith(prefix) else c.name for c in self.calls]

    def close(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


@pytest.fixture
def hook_recorder() -> Iterator[HookRecorder]:
    recorder = HookRecorder()
    yield recorder
    recorder.close()


@pytest.fixture(scope="session")
def qemu_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Session fixture: a :class:`snapcore.testing.vm.TestVM` (Debian's kernel under qemu).

    Each ``vm.run(cmd)`` / ``vm.pytest(args)`` is one boot; batch scenarios into one
    call (``vm.pytest`` with the same args reuses the boot). Skips, with the reason,
    only where qemu, the kernel or vng cannot be found.
    """
    from snapcore.testing.vm import TestVM, VMUnavailable

    try:
        vm = TestVM(workdir=tmp_path_factory.mktemp("vm"))
    except VMUnavailable as exc:
        pytest.skip(str(exc))
    yield vm


# -- what backends' tests need of the core ---------------------------------------------

#: A policy's ``freeze_timeout`` when it names none, in seconds.
DEFAULT_FREEZE_TIMEOUT = _DEFAULT_FREEZE_TIMEOUT


def target_of(manifest: snapcore.Manifest, record: snapcore.TargetRecord, state_dir: Path) -> snapcore.Target:
    """The :class:`~snapcore.Target` a backend's hooks get for one of ``manifest``'s
    targets, rebuilt as restore, verify and delete do (the live mount when it is still
    there)."""
    from snapcore.host.mounts import MountTable
    from snapcore.store.records import target_of as _target_of

    return _target_of(manifest, record, state_dir, MountTable.read())


def image_of(record: snapcore.TargetRecord) -> snapcore.Image | None:
    """The :class:`~snapcore.Image` a manifest's target record describes."""
    from snapcore.store.records import image_of as _image_of

    return _image_of(record)


def export_of(record: snapcore.TargetRecord) -> snapcore.Export | None:
    """The :class:`~snapcore.Export` a manifest's target record describes."""
    from snapcore.store.records import export_of as _export_of

    return _export_of(record)
