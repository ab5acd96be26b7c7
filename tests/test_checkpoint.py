"""The transaction, end to end, on real loop filesystems with the real fsfreeze backend."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import snapcore
from snapcore import CheckpointFailed, Consistency, Image, Role, Target, hookimpl
from snapcore.cli import main
from snapcore.host.mounts import read_mounts
from snapcore.plugins import Plugins, make_plugins
from snapcore.policy import load_policy
from snapcore.testing import HookRecorder, LoopFactory, Pace, assert_not_frozen, start_write, thaw_quietly
from snapcore.transaction import Transaction
from snapcore_fsfreeze.backend import Freezer

pytestmark = pytest.mark.usefixtures("root_only")


def test_write_to_frozen_mount_blocks_then_completes(loop_fs: LoopFactory, state_dir: Path, pace: Pace) -> None:
    fs = loop_fs("ext4")
    with snapcore.hold([fs], state_dir=state_dir) as txn:
        assert txn.image_of(str(fs.mount_point)) is not None
        probe = start_write(fs.mount_point / "during")
        assert not probe.done(pace.seconds(0.5)), "a write reached a frozen filesystem"
    assert probe.done(pace.seconds(10)), "the write did not complete after the thaw"
    assert (fs.mount_point / "during").read_bytes() == b"probe\n"


def test_three_filesystem_types_in_one_checkpoint(loop_fs: LoopFactory, state_dir: Path) -> None:
    mounts = [loop_fs("ext4"), loop_fs("xfs"), loop_fs("btrfs")]
    manifest = snapcore.checkpoint(mounts, state_dir=state_dir, checkpoint_id="three")
    assert manifest.outcome == "ok" and manifest.error is None
    assert manifest.freeze_window_ms is not None and manifest.freeze_window_ms > 0
    assert [t.fstype for t in manifest.targets] == ["ext4", "xfs", "btrfs"]
    for target in manifest.targets:
        assert target.imager == "fsfreeze"
        assert target.outcome == "ok"
        assert target.consistency == "quiesced"  # no exporter: nothing kept, said so
        assert target.warnings
        assert {"prepare", "freeze", "snapshot", "thaw"} <= set(target.timings)
        assert target.source.startswith("/dev/loop")
    for fs in mounts:
        assert_not_frozen(fs.mount_point)
    path = state_dir / "checkpoints" / "three" / "manifest.json"
    data = json.loads(path.read_text())
    for key in ("schema", "id", "outcome", "started", "finished", "error", "freeze_window_ms", "policy", "host"):
        assert key in data
    for key in ("mount", "source", "fstype", "imager", "exporter", "image", "export", "consistency", "timings"):
        assert key in data["targets"][0]


class SnapshotFails:
    """A fake failure (a snapshot error cannot be caused for real with FIFREEZE):
    it freezes for real through the fsfreeze code, then fails its snapshot."""

    def __init__(self) -> None:
        self.freezer = Freezer()

    @hookimpl
    def snapcore_backend_info(self) -> snapcore.BackendInfo:
        return snapcore.BackendInfo(name="failing", roles=frozenset({Role.IMAGER}), description="test")

    @hookimpl
    def snapcore_probe(self, mount: snapcore.Mount) -> snapcore.Support:
        return snapcore.Support.yes("test", score=0)

    @hookimpl
    def snapcore_freeze(self, target: Target) -> None:
        self.freezer.freeze(target.mount.mount_point, target.mount.mount_point)

    @hookimpl
    def snapcore_snapshot(self, target: Target) -> Image:
        raise RuntimeError("injected snapshot failure")

    @hookimpl
    def snapcore_thaw(self, target: Target) -> None:
        self.freezer.thaw(target.mount.mount_point)


def _policy_file(tmp_path: Path, rules: dict[str, str]) -> Path:
    body = "".join(f"  {mount}:\n    imager: {imager}\n" for mount, imager in rules.items())
    path = tmp_path / "policy.yaml"
    path.write_text(f"version: 1\nmounts:\n{body}")
    return path


def test_fake_snapshot_failure_in_the_middle_leaves_nothing_frozen(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, hook_recorder: HookRecorder
) -> None:
    a, b, c = loop_fs("ext4"), loop_fs("xfs"), loop_fs("ext4")
    plugins = make_plugins()
    plugins.register(SnapshotFails(), "failing")
    hook_recorder.attach(plugins.pm)
    policy = _policy_file(tmp_path, {str(a): "fsfreeze", str(b): "failing", str(c): "fsfreeze"})
    with pytest.raises(CheckpointFailed, match="injected snapshot failure") as info:
        snapcore.checkpoint(policy=policy, state_dir=state_dir, plugins=plugins, checkpoint_id="bad")
    for fs in (a, b, c):
        assert_not_frozen(fs.mount_point)
    manifest = info.value.manifest
    assert isinstance(manifest, snapcore.Manifest)
    assert manifest.outcome == "failed"
    assert all(t.outcome == "failed" for t in manifest.targets)
    by_mount = {t.mount: t for t in manifest.targets}
    assert "injected" in (by_mount[str(b)].error or "")
    on_disk = json.loads((state_dir / "checkpoints" / "bad" / "manifest.json").read_text())
    assert on_disk["outcome"] == "failed" and "injected" in on_disk["error"]
    names = hook_recorder.names()
    assert names.count("freeze") == 3 and names.count("thaw") == 3
    assert names.index("after_thaw") > max(i for i, n in enumerate(names) if n == "thaw")
    assert names[-1] == "checkpoint_end"


def test_backend_hooks_go_only_to_the_selected_backend(
    loop_fs: LoopFactory, state_dir: Path, hook_recorder: HookRecorder
) -> None:
    fs = loop_fs("ext4")
    plugins = make_plugins()
    hook_recorder.attach(plugins.pm)
    snapcore.checkpoint([fs], state_dir=state_dir, plugins=plugins)
    for call in hook_recorder.calls:
        if call.name in ("snapcore_freeze", "snapcore_snapshot", "snapcore_thaw", "snapcore_prepare"):
            assert call.plugins == ["fsfreeze"], call
    broadcast = [c for c in hook_recorder.calls if c.name == "snapcore_before_freeze"]
    assert len(broadcast) == 1


def test_frozen_by_someone_else_is_reported_and_left_alone(
    loop_fs: LoopFactory, state_dir: Path, capsys: pytest.CaptureFixture[str], pace: Pace
) -> None:
    a, b = loop_fs("ext4"), loop_fs("ext4")
    subprocess.run(["fsfreeze", "-f", str(b.mount_point)], check=True)
    try:
        code = main(["--state-dir", str(state_dir), "checkpoint", str(a), str(b), "--id", "busy"])
        assert code == 1
        _, err = capsys.readouterr()
        assert "already frozen by someone else" in err
        assert "Traceback" not in err
        assert_not_frozen(a.mount_point)
        # still frozen: we never thaw what someone else froze
        probe = start_write(b.mount_point / "x")
        assert not probe.done(pace.seconds(0.3))
    finally:
        assert thaw_quietly(b.mount_point)
    assert probe.done(pace.seconds(10))


def test_deadline_thaws_a_body_that_overstays(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path, pace: Pace
) -> None:
    fs = loop_fs("ext4")
    policy = tmp_path / "p.yaml"
    # 300 ms here, scaled: the freeze itself must fit in it so that the body is reached
    timeout_ms = round(pace.seconds(0.3) * 1000)
    policy.write_text(
        f"version: 1\nmounts:\n  {fs.mount_point}:\n    imager: fsfreeze\n    freeze_timeout: {timeout_ms}ms\n"
    )
    with pytest.raises(CheckpointFailed, match="freeze_timeout"), snapcore.hold(policy=policy, state_dir=state_dir):
        probe = start_write(fs.mount_point / "late")
        # the watchdog thaws at freeze_timeout, so the write completes while we are still inside
        assert probe.done(pace.seconds(5)), "the deadline watchdog did not thaw"
        time.sleep(0.1)
    assert_not_frozen(fs.mount_point)


def test_nested_loop_filesystem_is_frozen_before_its_holder(
    loop_fs: LoopFactory, state_dir: Path, hook_recorder: HookRecorder
) -> None:
    outer = loop_fs("ext4", size_mb=128)
    inner_factory = LoopFactory(outer.mount_point)
    try:
        inner = inner_factory("ext4")
        inner.write("data", b"x" * 4096)
        plugins = make_plugins()
        hook_recorder.attach(plugins.pm)
        manifest = snapcore.checkpoint([outer, inner], state_dir=state_dir, plugins=plugins)
        assert manifest.outcome == "ok"
        freezes = [c.kwargs["target"].mount.mount_point for c in hook_recorder.calls if c.name == "snapcore_freeze"]
        thaws = [c.kwargs["target"].mount.mount_point for c in hook_recorder.calls if c.name == "snapcore_thaw"]
        assert freezes == [str(inner.mount_point), str(outer.mount_point)]
        assert thaws == [str(outer.mount_point), str(inner.mount_point)]
    finally:
        inner_factory.close()


def test_not_required_target_that_cannot_freeze_is_a_warning(
    loop_fs: LoopFactory, state_dir: Path, tmp_path: Path
) -> None:
    fs = loop_fs("ext4")
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        policy = tmp_path / "p.yaml"
        policy.write_text(
            f"version: 1\nmounts:\n  {fs.mount_point}: {{imager: fsfreeze}}\n"
            f"  {tmpfs}: {{imager: fsfreeze, required: false}}\n"
        )
        manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir)
        assert manifest.outcome == "ok"
        skipped = next(t for t in manifest.targets if t.mount == str(tmpfs))
        assert skipped.outcome == "skipped"
        assert "tmpfs cannot be frozen" in skipped.warnings[0]
        # and when it is required, the checkpoint fails before anything is frozen
        policy.write_text(f"version: 1\nmounts:\n  {tmpfs}: {{imager: fsfreeze}}\n")
        with pytest.raises(snapcore.UnsupportedMount, match="tmpfs cannot be frozen"):
            snapcore.checkpoint(policy=policy, state_dir=state_dir)
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def test_none_imager_on_tmpfs_is_a_live_copy(tmp_path: Path, state_dir: Path) -> None:
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmpfs)], check=True)
    try:
        policy = tmp_path / "p.yaml"
        policy.write_text(f"version: 1\nmounts:\n  {tmpfs}: {{imager: none}}\n")
        manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir)
        assert manifest.targets[0].consistency == Consistency.LIVE_COPY.value
        # auto never picks 'none': tmpfs has no automatic imager
        with pytest.raises(snapcore.UnsupportedMount, match="no usable imager"):
            snapcore.checkpoint([tmpfs], state_dir=state_dir)
    finally:
        subprocess.run(["umount", str(tmpfs)], check=True)


def test_plan_touches_nothing(loop_fs: LoopFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = loop_fs("ext4"), loop_fs("btrfs")

    def ours() -> list[object]:  # other tests may mount things meanwhile: look at ours
        return [m for m in read_mounts() if m.mount_point.startswith(str(loop_fs.base))]

    before_mounts = ours()
    before_files = sorted(p.name for p in a.mount_point.iterdir())
    state = tmp_path / "never"
    assert main(["--state-dir", str(state), "plan", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"{a.mount_point} (ext4" in out and "imager:   fsfreeze" in out
    assert "none: yes" in out  # every other backend's answer is shown
    assert main(["--state-dir", str(state), "plan", "--json", str(a), str(b)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["imager"] for m in data["mounts"]] == ["fsfreeze", "fsfreeze"]
    assert ours() == before_mounts
    assert sorted(p.name for p in a.mount_point.iterdir()) == before_files
    assert not state.exists()
    assert_not_frozen(a.mount_point, timeout=2)


def test_payload_runs_with_images_and_decides_the_outcome(
    loop_fs: LoopFactory, state_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fs = loop_fs("ext4")
    code = main(
        [
            "--state-dir",
            str(state_dir),
            "checkpoint",
            str(fs),
            "--id",
            "ok1",
            "--",
            "sh",
            "-c",
            'echo "in $SNAPCORE_CHECKPOINT_ID"',
        ]
    )
    assert code == 0
    out = capfd.readouterr().out
    assert "in ok1" in out
    code = main(["--state-dir", str(state_dir), "checkpoint", str(fs), "--id", "bad1", "--", "sh", "-c", "exit 3"])
    assert code == 1
    out, err = capfd.readouterr()
    assert "exited with status 3" in err
    manifest = json.loads((state_dir / "checkpoints" / "bad1" / "manifest.json").read_text())
    assert manifest["outcome"] == "failed" and manifest["payload"]["status"] == 3
    assert_not_frozen(fs.mount_point)


def test_list_and_show(loop_fs: LoopFactory, state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fs = loop_fs("ext4")
    for cid in ("first", "second"):
        assert main(["--state-dir", str(state_dir), "checkpoint", str(fs), "--id", cid, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["id"] == cid
    assert main(["--state-dir", str(state_dir), "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in rows] == ["second", "first"]
    assert main(["--state-dir", str(state_dir), "show", "first"]) == 0
    assert "checkpoint first: ok" in capsys.readouterr().out
    assert main(["--state-dir", str(state_dir), "show", "nope"]) == 2
    assert main(["--state-dir", str(state_dir), "checkpoint", str(fs), "--id", "first"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_many_mounts_freeze_in_parallel(loop_fs: LoopFactory, state_dir: Path) -> None:
    mounts = [loop_fs("ext4") for _ in range(6)]
    manifest = snapcore.checkpoint(mounts, state_dir=state_dir)
    assert manifest.outcome == "ok"
    # six idle freezes one after another take ~6 x 25 ms; in parallel about one
    freezes = [t.timings["freeze"] for t in manifest.targets]
    assert manifest.freeze_window_ms is not None
    assert manifest.freeze_window_ms < sum(freezes)


def test_policy_paths_not_covered(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    a, b = loop_fs("ext4"), loop_fs("ext4")
    policy = _policy_file(tmp_path, {str(a): "fsfreeze"})
    with pytest.raises(snapcore.UsageError, match="not covered by the policy"):
        snapcore.checkpoint([b], policy=policy, state_dir=state_dir)


def test_transaction_object_from_policy(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    fs = loop_fs("xfs")
    policy = load_policy(_policy_file(tmp_path, {str(fs): "[fsfreeze]"}))
    plugins: Plugins = make_plugins()
    manifest = Transaction(plugins, policy, state_dir=state_dir).run()
    assert manifest.policy == str(tmp_path / "policy.yaml")
    assert manifest.targets[0].imager == "fsfreeze"


class Observer:
    """A plain observer (no backend) that records what it saw and may raise."""

    def __init__(self, fail_in: str | None = None) -> None:
        self.fail_in = fail_in
        self.seen: list[str] = []

    def _saw(self, hook: str) -> None:
        self.seen.append(hook)
        if hook == self.fail_in:
            raise RuntimeError(f"observer broke in {hook}")

    @hookimpl
    def snapcore_before_freeze(self, checkpoint: snapcore.Checkpoint) -> None:
        self._saw("before_freeze")

    @hookimpl
    def snapcore_after_thaw(self, checkpoint: snapcore.Checkpoint) -> None:
        self._saw("after_thaw")

    @hookimpl
    def snapcore_checkpoint_end(
        self, checkpoint: snapcore.Checkpoint, outcome: snapcore.Outcome, manifest: snapcore.Manifest
    ) -> None:
        self._saw("checkpoint_end")


@pytest.mark.parametrize("hook", ["after_thaw", "checkpoint_end"])
def test_an_observer_that_raises_keeps_no_other_from_its_hook(loop_fs: LoopFactory, state_dir: Path, hook: str) -> None:
    """pluggy stops a broadcast at the first plugin that raises: snapcore calls each
    plugin on its own, so one observer's failure is its own warning."""
    fs = loop_fs("ext4")
    plugins = make_plugins()
    first, broken, last = Observer(), Observer(fail_in=hook), Observer()
    for name, observer in (("first", first), ("broken", broken), ("last", last)):
        plugins.register(observer, name)
    manifest = snapcore.checkpoint([fs], state_dir=state_dir, plugins=plugins)
    assert manifest.outcome == "ok"
    for observer in (first, broken, last):
        assert observer.seen == ["before_freeze", "after_thaw", "checkpoint_end"]
    if hook == "after_thaw":
        assert any("after_thaw of broken raised RuntimeError: observer broke" in w for w in manifest.warnings)
    assert_not_frozen(fs.mount_point)


def test_an_observer_failing_before_the_freeze_fails_the_checkpoint_after_all_were_told(
    loop_fs: LoopFactory, state_dir: Path
) -> None:
    fs = loop_fs("ext4")
    plugins = make_plugins()
    first, broken, last = Observer(), Observer(fail_in="before_freeze"), Observer()
    for name, observer in (("first", first), ("broken", broken), ("last", last)):
        plugins.register(observer, name)
    with pytest.raises(CheckpointFailed, match="before_freeze failed: broken: RuntimeError: observer broke") as info:
        snapcore.checkpoint([fs], state_dir=state_dir, plugins=plugins)
    assert info.value.manifest is not None and info.value.manifest.outcome == "failed"  # type: ignore[attr-defined]
    for observer in (first, broken, last):  # every one was told, and told that it ended
        assert observer.seen == ["before_freeze", "after_thaw", "checkpoint_end"]
    assert_not_frozen(fs.mount_point)


class Stateful:
    """An imager keeping what prepare found in the target's own state, for the later hooks."""

    def __init__(self) -> None:
        self.freezer = Freezer()
        self.states: list[dict[str, object]] = []

    @hookimpl
    def snapcore_backend_info(self) -> snapcore.BackendInfo:
        return snapcore.BackendInfo(name="stateful", roles=frozenset({Role.IMAGER}), description="test")

    @hookimpl
    def snapcore_probe(self, mount: snapcore.Mount) -> snapcore.Support:
        return snapcore.Support.yes("test", score=0)

    @hookimpl
    def snapcore_prepare(self, target: Target, role: Role) -> None:
        target.state_of("stateful")["planned"] = target.mount.mount_point

    @hookimpl
    def snapcore_freeze(self, target: Target) -> None:
        self.freezer.freeze(target.mount.mount_point, target.mount.mount_point)

    @hookimpl
    def snapcore_snapshot(self, target: Target) -> Image:
        state = target.state_of("stateful")
        self.states.append(dict(state))
        return Image(
            backend="stateful", ref=None, consistency=Consistency.FS_FROZEN, details={"planned": state["planned"]}
        )

    @hookimpl
    def snapcore_thaw(self, target: Target) -> None:
        self.freezer.thaw(target.mount.mount_point)


def test_a_backend_keeps_per_target_state_on_the_target(loop_fs: LoopFactory, state_dir: Path, tmp_path: Path) -> None:
    a, b = loop_fs("ext4"), loop_fs("xfs")
    plugins = make_plugins()
    backend = Stateful()
    plugins.register(backend, "stateful")
    policy = _policy_file(tmp_path, {str(a): "stateful", str(b): "stateful"})
    for cid in ("st1", "st2"):
        manifest = snapcore.checkpoint(policy=policy, state_dir=state_dir, plugins=plugins, checkpoint_id=cid)
        assert {t.image_record["details"]["planned"] for t in manifest.targets if t.image_record} == {str(a), str(b)}
    assert sorted(str(s["planned"]) for s in backend.states) == sorted([str(a), str(b)] * 2)
    mount = snapcore.find_mount(a.mount_point)
    target = Target(checkpoint_id="x", mount=mount, imager="stateful")
    target.state_of("stateful")["k"] = 1
    assert target.state_of("other") == {} and "scratch" not in repr(target)
    assert target == Target(checkpoint_id="x", mount=mount, imager="stateful")  # state is no part of it
