"""Boots the test VM once and runs the in-guest dm tests (``guest/``) there.

The host's kernel has no device-mapper: every dm scenario runs inside Debian's
kernel under qemu (snapcore.vm), in one boot; each guest test's outcome is reported
here, with the guest's output on failure.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

GUEST_TESTS = Path(__file__).parent / "guest"
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_dm_scenarios_in_vm(qemu_vm: Any) -> None:
    run = qemu_vm.pytest(["--durations=8", str(GUEST_TESTS.relative_to(ROOT))], cwd=ROOT, timeout=600)
    result = run.result
    summary = ", ".join(f"{n.split('::')[-1]}={o}" for n, o in sorted(run.outcomes.items()))
    print(f"\nVM boot + guest tests: {result.seconds:.1f}s; {summary}")
    if "slowest" in result.stdout:
        print(result.stdout[result.stdout.index("slowest") :].split("\n\n")[0])
    assert not result.timed_out, result.describe()
    assert run.outcomes, "no guest test ran:\n" + result.describe()
    failed = run.failed()
    assert not failed and result.returncode == 0, "\n".join(
        [f"{n}: {run.messages.get(n, '')[:2000]}" for n in failed] + [result.describe(80)]
    )
    # the guest tests themselves never skip, except where a plugin is not installed
    skipped = {n: m for n, o in run.outcomes.items() if o == "skipped" for m in [run.messages.get(n, "")]}
    assert all("is not installed" in m for m in skipped.values()), skipped


def test_vm_timeout_kills_the_whole_group(qemu_vm: Any) -> None:
    result = qemu_vm.run("sleep 600", timeout=4)
    assert result.timed_out and not result.ok
    left = subprocess.run(["pgrep", "-f", str(result.outdir)], capture_output=True, text=True, check=False)
    assert left.stdout.strip() == "", f"processes left behind: {left.stdout}"
