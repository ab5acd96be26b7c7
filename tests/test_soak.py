"""The soak: a real SQLite application checkpointed with CRIU through snapcore, its
tree damaged, restored in place, again and again (``--soak-cycles N``, default 3).

After every cycle: ``PRAGMA integrity_check`` is ok, the rows are 1..N with no gap
or repeat, the counter went on from the checkpoint, and the program never read a
config or scratch content it did not write.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from snapcore.cli import main
from snapcore.tasks.criu import Criu
from snapcore.testing import Pace
from tests.test_cr import criu_and_btrfs  # noqa: F401 - a fixture, used by name

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

from crcycle import App, cycle

pytestmark = pytest.mark.usefixtures("root_only")


def test_sqlite_application_survives_checkpoint_damage_restore_cycles(
    criu_and_btrfs: tuple[Criu, Path],  # noqa: F811
    state_dir: Path,
    tmp_path: Path,
    pace: Pace,
    request: pytest.FixtureRequest,
) -> None:
    criu, mnt = criu_and_btrfs
    app = App(workdir=mnt, scratch=tmp_path, criu=criu.path, state_dir=state_dir, run=main)
    app.start(pace.seconds(20))
    cycles = request.config.getoption("--soak-cycles")
    try:
        app.wait_rows(10, pace.seconds(20))
        for i in range(cycles):
            seen = cycle(app, f"soak{i}", timeout=pace.seconds(20))
            assert seen.problems() == [], seen
            assert not app.bad_reads.exists(), app.bad_reads.read_text()
    finally:
        app.stop()
    # stopped: the database holds every row the program logged, and is sound
    assert app.integrity() == "ok"
    rows = app.rows()
    assert rows == list(range(1, len(rows) + 1)) and len(rows) >= len(seen.rows_after)
    # whatever the restores replaced is kept, as checkpoints of their own
    assert len(list((state_dir / "checkpoints").glob("before-restore-*"))) == cycles
