"""Boots the test VM once and runs the in-guest dm tests (``guest/``) there.

The host's kernel has no device-mapper: every dm scenario runs inside Debian's
kernel under qemu (snapcore.vm), in one boot; each guest test's outcome is reported
here, with the guest's output on failure. The boot also runs the conformance kit
against dm (``guest/test_dm_contract.py``); its fault matrix is printed.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from snapcore.contract import FAULT_PHASES
from snapcore.faults import ACTIONS

GUEST_TESTS = Path(__file__).parent / "guest"
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_dm_scenarios_in_vm(qemu_vm: Any) -> None:
    # SNAPCORE_DM_CONTRACT=all also runs the thin and tar conformance classes (~8 min more)
    everything = os.environ.get("SNAPCORE_DM_CONTRACT") == "all"
    run = qemu_vm.pytest(
        ["--durations=8", str(GUEST_TESTS.relative_to(ROOT))],
        cwd=ROOT,
        timeout=1500 if everything else 600,
        env={"SNAPCORE_DM_CONTRACT": "all"} if everything else None,
    )
    result = run.result
    scenarios = {n: o for n, o in run.outcomes.items() if "Contract" not in n}
    summary = ", ".join(f"{n.split('::')[-1]}={o}" for n, o in sorted(scenarios.items()))
    print(f"\nVM boot + guest tests: {result.seconds:.1f}s; {summary}")
    print(contract_matrix(run.outcomes))
    if "slowest" in result.stdout:
        print(result.stdout[result.stdout.index("slowest") :].split("\n\n")[0])
    assert not result.timed_out, result.describe()
    assert run.outcomes, "no guest test ran:\n" + result.describe()
    failed = run.failed()
    assert not failed and result.returncode == 0, "\n".join(
        [f"{n}: {run.messages.get(n, '')[:2000]}" for n in failed] + [result.describe(80)]
    )
    # the guest tests themselves never skip, except where a plugin is not installed
    # (and the contract's export faults, where a class has no exporter)
    skipped = {n: m for n, o in run.outcomes.items() if o == "skipped" for m in [run.messages.get(n, "")]}
    assert all("is not installed" in m or "no exporter in this contract" in m for m in skipped.values()), skipped


FAULT_RE = re.compile(r"::test_fault_leaves_nothing_frozen_or_half_made\[(\w+)-(\w+)\]$")


def contract_matrix(outcomes: Mapping[str, str]) -> str:
    """The conformance kit's results per class: the other tests, then phase x fault."""
    by_class: dict[str, dict[str, str]] = {}
    for nodeid, outcome in outcomes.items():
        owner = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
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
            for action in ACTIONS:
                lines.append(f"  {action:<6}" + "".join(f"{cells.get((action, p), '?'):>9}" for p in phases))
    return "\n".join(lines)


def test_vm_timeout_kills_the_whole_group(qemu_vm: Any) -> None:
    result = qemu_vm.run("sleep 600", timeout=4)
    assert result.timed_out and not result.ok
    left = subprocess.run(["pgrep", "-f", str(result.outdir)], capture_output=True, text=True, check=False)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
