"""Checkpoint → damage → restore cycles of ``sqlite_app.py`` with CRIU through
snapcore: what ``make demo`` shows and the soak test repeats.

Each cycle runs the commands a user runs::

    snapcore checkpoint --pid P -- criu dump -t P -D IMAGES --file-locks
    (the tree is damaged: garbage appended to the WAL, the config replaced by the
     atomic-save pattern, the log deleted)
    snapcore restore ID --in-place -- criu restore -D IMAGES -d --file-locks ...

and reads what a user would check: the rows (numbered 1..N, no gap, no repeat), the
database's integrity, and what the program read.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

APP = Path(__file__).with_name("sqlite_app.py")

#: ``snapcore ARGS`` → exit code (the CLI's ``main``, or a wrapper that prints).
Run = Callable[[Sequence[str]], int]


@dataclass
class App:
    """The SQLite application in ``workdir`` (on the mount under test)."""

    workdir: Path
    #: Outside the mount: CRIU images, the ready file, the program's bad reads.
    scratch: Path
    criu: str
    state_dir: Path
    run: Run
    pid: int = 0
    checkpoints: list[str] = field(default_factory=list)

    @property
    def bad_reads(self) -> Path:
        return self.scratch / "bad-reads.txt"

    @property
    def errors(self) -> Path:
        """The program's stderr (a traceback, if it dies)."""
        return self.scratch / "app.stderr"

    def start(self, timeout: float) -> int:
        """Start the program as its users do: in the background of a shell that exits,
        in a session of its own (CRIU wants a session leader), parented to PID 1."""
        ready = self.scratch / "ready"
        ready.unlink(missing_ok=True)
        line = 'setsid "$0" "$1" "$2" "$3" "$4" </dev/null >/dev/null 2>>"$5" &'
        argv = [sys.executable, str(APP), str(self.workdir), str(self.bad_reads), str(ready), str(self.errors)]
        subprocess.run(["sh", "-c", line, *argv], check=True)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{APP.name} did not start within {timeout:.0f}s")
            time.sleep(0.01)
        self.pid = int(ready.read_text())
        return self.pid

    def _db(self) -> sqlite3.Connection:
        # Read-only, and only while the program is not running (dumped, or stopped):
        # CRIU (4.2.1) does not restore the read lock SQLite holds on app.db-shm,
        # so another connection closing later believes it is the last one and
        # truncates the shared index under the restored program (SIGBUS).
        return sqlite3.connect(f"file:{self.workdir / 'app.db'}?mode=ro", uri=True, timeout=30)

    def rows(self) -> list[int]:
        """The counter of every committed row, in insertion order (from the database)."""
        db = self._db()
        try:
            return [n for (n,) in db.execute("SELECT n FROM rows ORDER BY id")]
        finally:
            db.close()

    def integrity(self) -> str:
        db = self._db()
        try:
            return str(db.execute("PRAGMA integrity_check").fetchone()[0])
        finally:
            db.close()

    def logged_rows(self) -> list[int]:
        """The rows the running program says it committed (``app.log``)."""
        try:
            lines = (self.workdir / "app.log").read_text().split("\n")
        except FileNotFoundError:
            return []
        return [int(line.split()[1]) for line in lines if line.startswith("row ")]

    def wait_rows(self, more_than: int, timeout: float) -> list[int]:
        """Wait for the running program to log more than ``more_than`` rows."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.logged_rows()
            if len(rows) > more_than:
                return rows
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the program wrote {len(rows)} rows, not more than {more_than}, in {timeout:.0f}s; {self.status()}"
                )
            time.sleep(0.05)

    def status(self) -> str:
        """Is the program there, and what is it doing (for a report)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{self.pid}/wchan") as f:
                wchan = f.read().strip()
        except OSError:
            said = self.errors.read_text(errors="replace").strip()[-1500:] if self.errors.exists() else ""
            return f"pid {self.pid} is gone" + (f"; its stderr: {said}" if said else "")
        return f"pid {self.pid} is in state {state}, waiting in {wchan or '-'}"

    def images(self, checkpoint_id: str) -> Path:
        return self.scratch / f"criu-{checkpoint_id}"

    def checkpoint(self, checkpoint_id: str) -> int:
        images = self.images(checkpoint_id)
        images.mkdir()
        dump = ["dump", "-t", str(self.pid), "-D", str(images), "--file-locks", "--log-file", "dump.log"]
        argv = ["--state-dir", str(self.state_dir), "checkpoint", "--pid", str(self.pid)]
        code = self.run([*argv, "--id", checkpoint_id, "--", self.criu, *dump])
        if code == 0:
            self.checkpoints.append(checkpoint_id)
        return code

    def damage(self) -> list[str]:
        """What the soak found plain CRIU restores onto: a corrupted WAL, a config
        replaced by the atomic-save pattern, a deleted log."""
        done = []
        with open(self.workdir / "app.db-wal", "ab") as f:
            f.write(os.urandom(4096))
        done.append("appended 4 KiB of garbage to app.db-wal")
        tmp = self.workdir / "config.json.tmp"
        tmp.write_text(json.dumps({"magic": "someone else's", "rows_per_second": 1}))
        os.rename(tmp, self.workdir / "config.json")
        done.append("replaced config.json (write config.json.tmp, rename it over)")
        (self.workdir / "app.log").unlink()
        done.append("deleted app.log")
        return done

    def restore(self, checkpoint_id: str) -> int:
        images = self.images(checkpoint_id)
        restore = ["restore", "-D", str(images), "-d", "--manage-cgroups=ignore", "--file-locks"]
        argv = ["--state-dir", str(self.state_dir), "restore", checkpoint_id, "--in-place"]
        return self.run([*argv, "--", self.criu, *restore, "--log-file", "restore.log"])

    def stop(self) -> None:
        if self.pid:
            subprocess.run(["kill", "-9", str(self.pid)], check=False, capture_output=True)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
                time.sleep(0.02)


@dataclass
class Cycle:
    """What one checkpoint → damage → restore cycle saw."""

    checkpoint_id: str
    #: The database's rows when the program was dumped, and its integrity then.
    rows_at_checkpoint: list[int]
    integrity: str
    damage: list[str]
    #: What the restored program logged: the checkpoint's rows, then its new ones.
    rows_after: list[int]

    def problems(self) -> list[str]:
        found = []
        if self.integrity != "ok":
            found.append(f"integrity_check: {self.integrity}")
        for name, rows in (("database", self.rows_at_checkpoint), ("log", self.rows_after)):
            if rows != list(range(1, len(rows) + 1)):
                found.append(f"the {name}'s rows are not 1..N: a gap or a repeat")
        if self.rows_after[: len(self.rows_at_checkpoint)] != self.rows_at_checkpoint:
            found.append("the restored program did not go on from the checkpoint's rows")
        if len(self.rows_after) <= len(self.rows_at_checkpoint):
            found.append(f"no new rows after the restore (had {len(self.rows_at_checkpoint)})")
        return found


def cycle(app: App, checkpoint_id: str, *, timeout: float, say: Callable[[str], None] = lambda _: None) -> Cycle:
    """One cycle; raises RuntimeError when a command fails."""
    if app.checkpoint(checkpoint_id) != 0:
        raise RuntimeError(f"checkpoint {checkpoint_id} failed")
    at_checkpoint, integrity = app.rows(), app.integrity()
    say(f"the program is gone (dumped by CRIU); its database: {len(at_checkpoint)} rows, integrity_check {integrity}")
    damage = app.damage()
    for line in damage:
        say(f"damage: {line}")
    if app.restore(checkpoint_id) != 0:
        raise RuntimeError(f"restore {checkpoint_id} failed")
    rows = app.wait_rows(len(at_checkpoint) + 5, timeout)
    say(f"restored, it goes on: {len(rows)} rows logged, numbered 1..{rows[-1] if rows else 0}")
    return Cycle(checkpoint_id, at_checkpoint, integrity, damage, rows)
