"""snapcore.testing itself: the session's order (``starts_early`` tests first,
``waits_late`` tests last, so the dm VM overlaps every host test) and tree
descriptions (what image, export and restore tests compare)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from snapcore.testing import assert_same_tree, describe_tree

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


def test_describe_tree_sees_content_mode_links_and_metadata(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("one\n")
    (root / "lost+found").mkdir()
    os.symlink("d/f", root / "l")
    plain = describe_tree(root, skip=["lost+found"])
    assert sorted(plain) == [b"d", b"d/f", b"l"]
    full = describe_tree(root, metadata=True)
    assert b"." in full and b"lost+found" in full
    assert_same_tree(root, full)

    (root / "d" / "f").write_text("two\n")
    assert describe_tree(root, skip=["lost+found"]) != plain
    (root / "d" / "f").write_text("one\n")
    assert describe_tree(root, skip=["lost+found"]) == plain  # content and mode, not times
    with pytest.raises(AssertionError, match="d/f"):
        assert_same_tree(root, full)  # the mtime moved
    os.chmod(root / "d" / "f", 0o600)
    assert describe_tree(root, skip=["lost+found"]) != plain
    os.link(root / "d" / "f", root / "hard")
    with pytest.raises(AssertionError, match="different names"):
        assert_same_tree(root, full)
