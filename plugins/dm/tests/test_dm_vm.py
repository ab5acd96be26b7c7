"""Boots the test VM and runs the in-guest dm tests (``guest/``) there.

The host's kernel has no device-mapper: every dm scenario runs inside Debian's
kernel under qemu (snapcore.testing.vm). One boot runs both guest suites: the
scenarios (``guest/test_dm_guest.py``) and the conformance kit against dm
(``guest/test_dm_contract.py``, whose fault matrix is printed); each has a test here
that judges its own part of the run. The boot starts with the session, in a thread of
its own (``test_the_guest_run_starts_with_the_session`` is marked ``starts_early``
and the tests that judge it ``waits_late``: :mod:`snapcore.testing` moves them to the
front and to the end): the ~12 minutes the guest takes (it emulates its CPU) overlap the host's
tests instead of following them. Each guest test's start and outcome stream to the
host as they happen and are printed when the test here that judges them runs; a
test that overstays its allowance — derived from this run's boot time and one
``lvcreate -s`` timed in the guest, never a constant — stops the boot, and the
failure names it, with what passed and failed before it.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from snapcore.contract import FAULT_ACTIONS, FAULT_PHASES
from snapcore.testing import Pace
from snapcore.testing.vm import Budget, GuestTests

GUEST_TESTS = Path(__file__).parent / "guest"
ROOT = Path(__file__).resolve().parents[3]
SCENARIOS = GUEST_TESTS / "test_dm_guest.py"
CONTRACT = GUEST_TESTS / "test_dm_contract.py"

#: A guest test may take this many times one ``lvcreate -s`` of this guest. The
#: slowest scenario costs ~12 of them (three checkpoints of a writer, each with an
#: lvcreate, a mount and a hash of both trees), a contract test ~6.
LVCREATES_PER_TEST = 40.0
#: ... or this many boot times (qemu start to the guest's pytest running), whichever
#: is more: the boot is the first figure of the run, before any lvcreate is timed.
BOOTS_PER_TEST = 6.0


def budget(pace: Pace) -> Budget:
    """The allowances of one boot of dm tests, from this run's measurements."""
    return Budget(
        boot_floor_s=pace.seconds(150),
        test_floor_s=pace.seconds(30),
        boot_times=BOOTS_PER_TEST,
        per_measure={"lvcreate_s": LVCREATES_PER_TEST},
    )


def describe_event(event: dict[str, Any]) -> str | None:
    """A guest event as a line for the terminal, or None."""
    ev = event.get("ev")
    if ev == "measure":
        return f"[vm] guest measured {event.get('figures')}"
    if ev == "report" and (event.get("when") == "call" or event.get("outcome") != "passed"):
        what = (
            event.get("outcome", "?")
            if event.get("when") == "call"
            else f"{event.get('outcome')} in {event.get('when')}"
        )
        return f"[vm] {event.get('nodeid')}: {what} ({float(event.get('duration') or 0):.1f}s)"
    return None


def live(capsys: pytest.CaptureFixture[str]) -> Callable[[dict[str, Any]], None]:
    """Prints each guest test's outcome on the terminal as it arrives."""

    def show(event: dict[str, Any]) -> None:
        line = describe_event(event)
        if line:
            with capsys.disabled():
                print("\n" + line, end="", flush=True)

    return show


class GuestRun:
    """Both guest suites in one boot, in a thread of its own from the session's start."""

    def __init__(self, vm: Any, allowed: Budget) -> None:
        self.vm = vm
        self.allowed = allowed
        self.lines: list[str] = []
        self.result: GuestTests | None = None
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dm-guest-run", daemon=True)

    def _run(self) -> None:
        suites = [str(p.relative_to(ROOT)) for p in (SCENARIOS, CONTRACT)]
        # SNAPCORE_DM_CONTRACT=all also runs the thin and tar conformance classes (~8 min more)
        env = {"SNAPCORE_DM_CONTRACT": "all"} if os.environ.get("SNAPCORE_DM_CONTRACT") == "all" else None
        try:
            self.result = self.vm.pytest(
                ["--durations=8", *suites], cwd=ROOT, budget=self.allowed, on_event=self._event, env=env, stop=self.stop
            )
        except BaseException as exc:  # given to the tests that wait for the run
            self.error = exc

    def _event(self, event: dict[str, Any]) -> None:
        line = describe_event(event)
        if line:
            self.lines.append(line)

    def wait(self, capsys: pytest.CaptureFixture[str]) -> GuestTests:
        """The run's result, once it is over (it is bounded by its own budget); the
        guest's lines are printed once, by the first test that waits."""
        self.thread.join()
        with capsys.disabled():
            allowed = self.allowed
            header = (
                f"[vm] {SCENARIOS.name} and {CONTRACT.name}: boot allowed {allowed.boot_floor_s:.0f}s; then each "
                f"test the most of {allowed.test_floor_s:.0f}s, {BOOTS_PER_TEST:g} boots, "
                f"{LVCREATES_PER_TEST:g} x lvcreate -s"
            )
            lines, self.lines = self.lines, []
            print("".join("\n" + line for line in ([header, *lines] if lines else [])), end="", flush=True)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.fixture(scope="session")
def guest_run(qemu_vm: Any, pace: Pace) -> Iterator[GuestRun]:
    run = GuestRun(qemu_vm, budget(pace))
    run.thread.start()
    yield run
    run.stop.set()  # a session that ends first (-x, ^C) leaves no qemu behind
    run.thread.join()


def check(run: GuestTests, suite: Path) -> None:
    """The run went through, and ``suite``'s own tests passed."""
    result = run.result
    progress = result.progress
    assert progress is not None
    print(f"\nVM boot {progress.boot_s or 0:.1f}s, guest measures {progress.measures}, whole run {result.seconds:.1f}s")
    if "slowest" in result.stdout:
        print(result.stdout[result.stdout.index("slowest") :].split("\n\n")[0])
    assert not result.timed_out, result.describe()
    prefix = str(suite.relative_to(ROOT)) + "::"
    mine = {n: o for n, o in run.outcomes.items() if n.startswith(prefix)}
    assert mine, f"no guest test of {suite.name} ran:\n" + result.describe()
    failed = [n for n, o in mine.items() if o in ("failed", "error")]
    assert not failed, result.describe(80)
    # a non-zero status with no failed test anywhere: the run itself broke (collection)
    assert result.returncode == 0 or run.failed(), result.describe(80)
    # the guest tests themselves never skip, except where a plugin is not installed
    # (and the contract's export faults, where a class has no exporter)
    skipped = {n: run.messages.get(n, "") for n, o in mine.items() if o == "skipped"}
    assert all("is not installed" in m or "no exporter in this contract" in m for m in skipped.values()), skipped


@pytest.mark.starts_early
def test_the_guest_run_starts_with_the_session(guest_run: GuestRun) -> None:
    assert guest_run.thread.is_alive() or guest_run.result is not None or guest_run.error is not None


@pytest.mark.slow
@pytest.mark.waits_late
@pytest.mark.timeout(0)  # the guest run is bounded by its own budget (measured in this run)
def test_dm_scenarios_in_vm(guest_run: GuestRun, capsys: pytest.CaptureFixture[str]) -> None:
    check(guest_run.wait(capsys), SCENARIOS)


@pytest.mark.slow
@pytest.mark.waits_late
@pytest.mark.timeout(0)  # the guest run is bounded by its own budget (measured in this run)
def test_dm_contract_in_vm(guest_run: GuestRun, capsys: pytest.CaptureFixture[str]) -> None:
    run = guest_run.wait(capsys)
    print(contract_matrix(run.outcomes))
    check(run, CONTRACT)


FAULT_RE = re.compile(r"::test_fault_leaves_nothing_frozen_or_half_made\[(\w+)-(\w+)\]$")


def contract_matrix(outcomes: Mapping[str, str]) -> str:
    """The conformance kit's results per class: the other tests, then phase x fault."""
    by_class: dict[str, dict[str, str]] = {}
    for nodeid, outcome in outcomes.items():
        owner = nodeid.split("::")[1] if "::" in nodeid else nodeid
        if "Contract" in owner:
            by_class.setdefault(owner, {})[nodeid] = outcome
    short = {"passed": "ok", "failed": "FAIL", "error": "ERROR", "skipped": "-"}
    lines = []
    for owner, tests in sorted(by_class.items()):
        cells: dict[tuple[str, str], str] = {}
        others = []
        for nodeid, outcome in sorted(tests.items()):
            m = FAULT_RE.search(nodeid)
            if m:
                cells[(m.group(2), m.group(1))] = short.get(outcome, outcome)
            else:
                others.append(f"{nodeid.split('::')[-1]}={short.get(outcome, outcome)}")
        lines.append(f"{owner}: {', '.join(others)}")
        if cells:
            phases = [p for p in FAULT_PHASES if any(k[1] == p for k in cells)]
            lines.append("  " + " " * 6 + "".join(f"{p:>9}" for p in phases))
            for action in FAULT_ACTIONS:
                lines.append(f"  {action:<6}" + "".join(f"{cells.get((action, p), '?'):>9}" for p in phases))
    return "\n".join(lines)


HANGING_SUITE = """
import time

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "a deliberate failure, reported before the hang"

def test_hangs():
    time.sleep(3600)

def test_never_reached():
    pass
"""


@pytest.mark.waits_late  # one VM at a time: it waits for the guest run anyway
@pytest.mark.timeout(0)  # bounded by its own budget, and it waits for the guest run's lock
def test_a_hung_guest_test_is_named_and_leaves_no_qemu(
    qemu_vm: Any, pace: Pace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the guest sees the host's files read-only: it runs this suite from tmp_path
    (tmp_path / "test_hanging.py").write_text(textwrap.dedent(HANGING_SUITE))
    allowed = Budget(boot_floor_s=pace.seconds(150), test_floor_s=pace.seconds(3), boot_times=0.5)
    run = qemu_vm.pytest(["test_hanging.py"], cwd=tmp_path, budget=allowed, on_event=live(capsys))
    result = run.result
    report = result.describe()
    assert result.timed_out and not result.ok, report
    assert result.stopped is not None and "test_hanging.py::test_hangs ran" in result.stopped, report
    assert "RUNNING when stopped: test_hanging.py::test_hangs" in report
    assert run.outcomes == {"test_hanging.py::test_passes": "passed", "test_hanging.py::test_fails": "failed"}
    assert "a deliberate failure, reported before the hang" in report
    left = subprocess.run(["pgrep", "-f", str(result.outdir)], capture_output=True, text=True, check=False)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
