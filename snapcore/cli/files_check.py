"""``snapcore check-files ID [--root DIR]`` and the same check before ``restore ... --
CMD`` runs CMD: the files the checkpointed tasks need are there, as they had them
(:func:`snapcore.tasks.digests.check_files`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from snapcore.cli.common import print_json, state_dir_arg
from snapcore.errors import ExitCode, SnapcoreError, UsageError


def problems_of(
    args: argparse.Namespace, root: Path, *, all_digests: bool = False, similar_host: bool = False
) -> tuple[str, list[str]]:
    """The checkpoint's id and what differs at ``root``: ``/``, every file where it was
    (with ``--mount``, that mount's); else a copy laid out as ``restore --to`` lays it
    out (one mount: its tree at ``root``; several: each at ``root/<mount point>``),
    the files of those mounts, and with ``similar_host`` (the program is to run on
    this host, another than the checkpoint's) the other files where they were."""
    from snapcore.store.confine import beneath
    from snapcore.store.restore import records_of
    from snapcore.tasks.digests import check_files

    from_dir = Path(args.from_dir) if args.from_dir else None
    manifest, records = records_of(state_dir_arg(args), args.checkpoint_id, from_dir, args.mount)
    trees = None
    if root != Path("/"):
        trees = {r.mount: (beneath(root, r.mount) if len(records) > 1 else root) for r in records}
    elif args.mount:  # where they were, but only that mount's
        trees = {r.mount: Path(r.mount) for r in records}
    # ghost copies live in this host's state directory, or travelled with the export
    # (checkpoint --send-images): then they are checked there
    from snapcore.store.export_files import GHOSTS_NAME

    ghost_dir = from_dir / GHOSTS_NAME if from_dir is not None else None
    if ghost_dir is not None and (ghost_dir.is_symlink() or not ghost_dir.is_dir()):
        ghost_dir = None
    ghosts = from_dir is None or ghost_dir is not None
    problems = check_files(
        manifest.files or [],
        trees,
        ghosts=ghosts,
        all_digests=all_digests,
        ghost_dir=ghost_dir,
        similar_host=similar_host,
    )
    return manifest.id, problems


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint_id", metavar="ID", nargs="?")
    p.add_argument("--from", dest="from_dir", metavar="EXPORT_DIR", help="the manifest an export directory carries")
    p.add_argument("--root", default="/", metavar="DIR", help="where the files are (a restore --to DIR; default /)")
    p.add_argument("--mount", metavar="M", help="only the files on this mount point")
    p.add_argument("--all-digests", action="store_true", help="hash every file, also those recorded without a digest")
    p.add_argument("--json", action="store_true")


def cmd_check_files(args: argparse.Namespace) -> int:
    if (args.checkpoint_id is None) == (args.from_dir is None):
        raise UsageError("give a checkpoint ID or --from EXPORT_DIR (see 'snapcore check-files --help')")
    root = Path(os.path.abspath(args.root))
    checkpoint_id, problems = problems_of(args, root, all_digests=args.all_digests)
    if args.json:
        print_json({"id": checkpoint_id, "root": str(root), "ok": not problems, "problems": problems})
    else:
        for problem in problems:
            print(problem)
    if problems:
        raise SnapcoreError(
            f"checkpoint {checkpoint_id}: {len(problems)} file(s) the tasks need differ from what they had at {root}"
        )
    if not args.json:
        print(f"checkpoint {checkpoint_id}: the files the tasks need are as they had them at {root}")
    return ExitCode.OK


def check_before(args: argparse.Namespace, command: list[str]) -> None:
    """Before ``restore ... -- CMD`` runs CMD: the restored files are the checkpoint's,
    or CMD does not run (``--no-check`` skips this)."""
    root = Path(os.path.abspath(args.to)) if args.to else Path("/")
    # from an export: this may be another host, whose files on the mounts the export
    # does not bring (libraries, binaries) must be the ones the program had
    checkpoint_id, problems = problems_of(args, root, similar_host=bool(args.from_dir))
    if problems:
        for problem in problems:
            print(f"snapcore: {problem}", file=sys.stderr)
        raise SnapcoreError(
            f"checkpoint {checkpoint_id}: {len(problems)} file(s) the tasks need differ from what they had: "
            f"not running {command[0]} (restore again, or --no-check to run it anyway)"
        )
    print(f"checkpoint {checkpoint_id}: the files the tasks need are as they had them", flush=True)
