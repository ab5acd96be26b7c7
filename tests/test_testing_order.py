"""snapcore.testing's ordering of a session: ``starts_early`` tests first, ``waits_late``
tests last, the rest in pytest's order between them (the dm VM starts first and is
judged last, so it overlaps every host test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = """
import pytest

def test_a(): pass

@pytest.mark.waits_late
def test_judge(): pass

def test_b(): pass

@pytest.mark.starts_early
def test_start(): pass

def test_c(): pass
"""


def test_starts_early_first_and_waits_late_last(tmp_path: Path) -> None:
    (tmp_path / "test_order.py").write_text(TESTS)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "snapcore.testing",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "test_order.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split("::")[-1] for line in done.stdout.splitlines() if "::" in line]
    assert names == ["test_start", "test_a", "test_b", "test_c", "test_judge"]
