"""A small SQLite application, the kind snapcore exists for (the soak and the demo).

``python sqlite_app.py DIR BAD_READS READY`` works in ``DIR`` the way real programs
do: a database in WAL mode taking ~45 commits a second, each row numbered by a
counter kept in memory; ``config.json`` held open and re-read through its descriptor
before every commit; ``app.log`` open for append; a scratch file deleted but kept
open. Whenever it reads a config or scratch content it did not write, it appends
what it read to ``BAD_READS`` (a file outside ``DIR``): a checkpoint/restore that
puts it back on a damaged tree shows there. ``READY`` appears once it runs.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time

MAGIC = "snapcore-demo"
SCRATCH = "scratch " * 64


def main(workdir: str, bad_reads: str, ready: str) -> None:
    os.chdir(workdir)
    if not os.path.exists("config.json"):
        with open("config.json", "w") as f:
            json.dump({"magic": MAGIC, "rows_per_second": 45}, f)
    db = sqlite3.connect("app.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, at REAL)")
    config = open("config.json")  # noqa: SIM115 - held open for the program's life
    log = open("app.log", "a")  # noqa: SIM115
    scratch = open("scratch.tmp", "w+")  # noqa: SIM115
    scratch.write(SCRATCH)
    scratch.flush()
    os.unlink("scratch.tmp")
    n = db.execute("SELECT COALESCE(MAX(n), 0) FROM rows").fetchone()[0]
    with open(ready + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(ready + ".tmp", ready)
    while True:
        config.seek(0)
        text = config.read()
        try:
            good = json.loads(text).get("magic") == MAGIC
        except (ValueError, AttributeError):
            good = False
        scratch.seek(0)
        if not good or scratch.read() != SCRATCH:
            with open(bad_reads, "a") as f:
                f.write(f"{time.time():.3f} row {n}: read {text!r}\n")
        n += 1
        db.execute("INSERT INTO rows (n, at) VALUES (?, ?)", (n, time.time()))
        log.write(f"row {n}\n")
        log.flush()
        time.sleep(1 / 45)


if __name__ == "__main__":
    main(*sys.argv[1:4])
