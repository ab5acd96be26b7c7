"""The conformance kit: the tests every backend must pass, run against itself.

A backend distribution subclasses :class:`BackendContract` in its tests, sets what
it images (and exports), and pytest runs the whole contract against the real
backend on real loop filesystems::

    from snapcore.contract import BackendContract

    class TestContract(BackendContract):
        imager = "mybackend"
        fstype = "ext4"

It checks: the backend loads and probes; hook order; every freeze is thawed once;
consistency labels are honest; discard is idempotent; listing shows the images; and,
for every phase and fault (raise, hang, controller SIGKILL), that nothing is left
frozen, no half-made image is reported complete, the exit code is not 0, and the
manifest (written by the checkpoint or by ``snapcore recover``) says it failed.
Needs the fixtures of :mod:`snapcore.testing` (``-p snapcore.testing``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from snapcore.host.mounts import MountTable
from snapcore.plugins import Plugins, make_plugins
from snapcore.safety.faults import ACTIONS
from snapcore.store.records import image_of, target_of
from snapcore.testing import HookRecorder, LoopFactory, Pace, assert_not_frozen, wait_for_path
from snapcore.types import Consistency, Role

#: Phases a fault is injected at: the backend hooks, then the core's own steps.
FAULT_PHASES = ("prepare", "freeze", "snapshot", "thaw", "export", "finish", "payload", "manifest")
#: What an injected fault does there (``SNAPCORE_FAULT=PHASE=ACTION``).
FAULT_ACTIONS = ACTIONS
DEADLINE_S = 0.5
HONEST = {c.value for c in Consistency}


class BackendContract:
    """Subclass as ``Test…`` and set the class attributes below."""

    #: the imager under test (or the imager paired with the exporter under test)
    imager: ClassVar[str]
    #: the exporter under test, if any
    exporter: ClassVar[str | None] = None
    #: the filesystem to make for it
    fstype: ClassVar[str] = "ext4"
    #: backends to load (SNAPCORE_PLUGINS); default: the imager and exporter
    plugins: ClassVar[tuple[str, ...]] = ()
    #: the policy's ``freeze_timeout`` in seconds on the reference machine; the run
    #: scales it by the machine's pace (:meth:`contract_deadline`). Where the
    #: snapshot itself is slow (``lvcreate -s`` in an emulated VM), override
    #: ``contract_deadline`` with a figure derived from a measurement of it instead
    deadline_s: ClassVar[float] = DEADLINE_S

    # -- hooks for subclasses -----------------------------------------------------

    def make_mount(self, loop_fs: LoopFactory) -> Path:
        """A mount this backend can image; fill it with a little data."""
        fs = loop_fs(self.fstype)
        fs.write("data/file.txt", "contract\n")
        return fs.mount_point

    def backend_options(self, tmp_path: Path) -> dict[str, dict[str, Any]]:
        """Options per backend for the policy (e.g. an exporter's ``dest``)."""
        return {}

    # -- fixtures -------------------------------------------------------------------

    @pytest.fixture
    def contract_env(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
        names = self.plugins or tuple(n for n in (self.imager, self.exporter) if n)
        run_dir = tmp_path / "run"
        run_dir.mkdir(mode=0o700)
        monkeypatch.setenv("SNAPCORE_PLUGINS", ",".join(names))
        monkeypatch.setenv("SNAPCORE_RUN_DIR", str(run_dir))
        monkeypatch.delenv("SNAPCORE_FAULT", raising=False)
        return dict(os.environ)

    @pytest.fixture
    def contract_mount(self, loop_fs: LoopFactory, contract_env: dict[str, str]) -> Path:
        if os.geteuid() != 0:
            pytest.skip("the backend contract needs root")
        return self.make_mount(loop_fs)

    @pytest.fixture
    def contract_deadline(self, pace: Pace) -> float:
        """The freeze deadline of this run, in seconds: :attr:`deadline_s` at this
        machine's pace. Override to derive it from a measurement of the snapshot."""
        return pace.seconds(self.deadline_s)

    @pytest.fixture
    def contract_policy(self, contract_mount: Path, tmp_path: Path, contract_deadline: float) -> Path:
        rule: dict[str, Any] = {"imager": self.imager, "freeze_timeout": f"{int(contract_deadline * 1000)}ms"}
        if self.exporter:
            rule["exporter"] = self.exporter
        options = self.backend_options(tmp_path)
        if options:
            rule["options"] = options
        path = tmp_path / "contract-policy.yaml"
        path.write_text(json.dumps({"version": 1, "mounts": {str(contract_mount): rule}}))  # JSON is YAML
        return path

    def _plugins(self) -> Plugins:
        plugins = make_plugins()
        for name in (self.imager, self.exporter):
            if name and name not in plugins.backends:
                pytest.fail(f"backend {name!r} is not loaded: {plugins.unknown_message(name)}")
        return plugins

    # -- the contract ---------------------------------------------------------------

    def test_backend_loads_and_probes(self, contract_mount: Path) -> None:
        plugins = self._plugins()
        assert Role.IMAGER in plugins.info(self.imager).roles
        if self.exporter:
            assert Role.EXPORTER in plugins.info(self.exporter).roles
        answer = plugins.probe(self.imager, MountTable.read().find(contract_mount))
        assert answer is None or (answer.ok and answer.reason), answer

    def test_hook_order_and_one_thaw_per_freeze(
        self, contract_policy: Path, state_dir: Path, hook_recorder: HookRecorder, contract_mount: Path
    ) -> None:
        import snapcore

        plugins = self._plugins()
        hook_recorder.attach(plugins.pm)
        manifest = snapcore.checkpoint(policy=contract_policy, state_dir=state_dir, plugins=plugins)
        names = hook_recorder.names()
        order = ["prepare", "rescue", "before_freeze", "freeze", "snapshot", "thaw", "after_thaw", "checkpoint_end"]
        positions = [names.index(n) for n in order if n in names]
        assert positions == sorted(positions), names
        assert names.count("freeze") == names.count("thaw") == 1
        if self.exporter:
            assert "export" in names
        assert manifest.outcome == "ok"
        assert_not_frozen(contract_mount)

    def test_consistency_label_is_honest(self, contract_policy: Path, state_dir: Path) -> None:
        import snapcore

        manifest = snapcore.checkpoint(policy=contract_policy, state_dir=state_dir, plugins=self._plugins())
        (target,) = manifest.targets
        assert target.consistency in HONEST, target.consistency
        if target.image is None and target.export is None:
            assert target.consistency in (Consistency.QUIESCED.value, Consistency.LIVE_COPY.value)
        if target.consistency == Consistency.ATOMIC.value:
            assert target.image is not None, "an atomic image must exist"

    def test_discard_is_idempotent_and_listing_follows(self, contract_policy: Path, state_dir: Path) -> None:
        import snapcore

        plugins = self._plugins()
        manifest = snapcore.checkpoint(policy=contract_policy, state_dir=state_dir, plugins=plugins)
        (record,) = manifest.targets
        target = target_of(manifest, record, state_dir, MountTable.read())
        image = image_of(record)
        listed = [e for e in plugins.list_images(self.imager, target.mount) if e.checkpoint_id == manifest.id]
        if image is not None and image.ref is not None and plugins.implements(self.imager, "snapcore_list_images"):
            assert [e.ref for e in listed] == [image.ref]
        for _ in range(2):
            plugins.discard(self.imager, target, image, None)
        assert [e for e in plugins.list_images(self.imager, target.mount) if e.checkpoint_id == manifest.id] == []

    @pytest.mark.parametrize("action", ACTIONS)
    @pytest.mark.parametrize("phase", FAULT_PHASES)
    def test_fault_leaves_nothing_frozen_or_half_made(
        self,
        phase: str,
        action: str,
        contract_policy: Path,
        contract_mount: Path,
        contract_env: dict[str, str],
        contract_deadline: float,
        state_dir: Path,
        tmp_path: Path,
        pace: Pace,
    ) -> None:
        if phase == "export" and not self.exporter:
            pytest.skip("no exporter in this contract")
        cid = f"fault-{phase}-{action}"
        reached = tmp_path / f"{cid}.reached"
        env = dict(contract_env, SNAPCORE_FAULT=f"{phase}={action}", SNAPCORE_FAULT_REACHED=str(reached))
        argv = [sys.executable, "-m", "snapcore", "--state-dir", str(state_dir), "checkpoint"]
        argv += ["--policy", str(contract_policy), "--id", cid, "--", "true"]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = ""
        try:
            if action == "hang":
                # the controller sleeps in the fault for an hour: wait until it is
                # really there (no guessed time), then the deadline must thaw
                # whatever it froze, by the guard, without the controller's help
                wait_for_path(reached, proc, pace.seconds(60), f"{phase}={action}: reaching the fault")
                assert_not_frozen(contract_mount, timeout=contract_deadline + 1.0)
                proc.kill()
            code = proc.wait(timeout=pace.seconds(contract_deadline + 20))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            tail = proc.stderr.read().decode(errors="replace")[-3000:] if proc.stderr else ""
            got = reached.read_text().split() if reached.exists() else []
            pytest.fail(f"{phase}={action}: the controller did not finish (faults reached: {got}); its stderr:\n{tail}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                err = proc.stderr.read().decode(errors="replace")
                proc.stderr.close()
        assert code != 0, f"{phase}={action}: exit 0"
        assert "Traceback" not in err, err
        assert_not_frozen(contract_mount)
        # what the checkpoint could not say (it was killed), recover does: the
        # command's own entry point, in this process (an interpreter start costs
        # seconds in an emulated VM, and this runs for every cell of the matrix)
        from snapcore.cli import main

        assert main(["--state-dir", str(state_dir), "recover"]) == 0
        path = state_dir / "checkpoints" / cid / "manifest.json"
        manifest = json.loads(path.read_text())
        assert manifest["outcome"] == "failed", manifest
        assert all(t["outcome"] != "ok" for t in manifest["targets"]), manifest["targets"]
        # no half-made image survives under this checkpoint's id
        plugins = self._plugins()
        mount = MountTable.read().find(contract_mount)
        leftovers = [e for e in plugins.list_images(self.imager, mount) if e.checkpoint_id == cid]
        assert leftovers == [], leftovers
        assert_not_frozen(contract_mount)
