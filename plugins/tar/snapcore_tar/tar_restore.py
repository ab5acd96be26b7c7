"""Reading ``tar`` exports back: ``verify`` (every archive of the chain against its
recorded sha256 and member count, and read to the end by GNU tar's listing, which
:mod:`.safety` checks) and ``restore`` (the same checks, then the chain extracted
in order, level 0 first, into a new, empty directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from snapcore import BackendError, Export
from snapcore_tar import common
from snapcore_tar.common import manifest_problem, tool
from snapcore_tar.runner import run, sha256_file
from snapcore_tar.safety import ScanState, UnsafeArchive, scan
from snapcore_tar.tar_format import EXTRACT_FLAGS, NAME, Link, chain_of


def _check_sum(link: Link) -> str | None:
    expected = str(link.info.get("sha256") or "")
    if not expected:
        return f"{link.archive}: no sha256 recorded in {link.dir}"
    try:
        actual = sha256_file(link.archive)
    except FileNotFoundError:
        return f"{link.archive} is missing"
    except OSError as exc:
        return f"{link.archive}: {exc.strerror}"
    if actual != expected:
        return (
            f"{link.archive}: sha256 mismatch (recorded {expected[:16]}…, found {actual[:16]}…): the archive is corrupt"
        )
    return None


def verify(export: Export, name: str) -> list[str]:
    export_dir = Path(export.path or Path(export.ref).parent)
    try:
        links = chain_of(export_dir, name)
    except BackendError as exc:
        return [str(exc)]
    problems: list[str] = []
    problem = manifest_problem(export_dir, links[-1].checkpoint_id)
    if problem:
        problems.append(problem)
    state = ScanState()
    for link in links:
        problem = _check_sum(link)
        if problem:
            problems.append(problem)
            continue
        try:
            members = scan(link.archive, link.compress.read, state)
        except UnsafeArchive as exc:
            problems.append(f"{link.archive}: unsafe to restore: {exc}")
            continue
        except BackendError as exc:
            problems.append(f"{link.archive}: unreadable: {exc}")
            continue
        recorded = link.info.get("files")
        if isinstance(recorded, int) and recorded != members:
            problems.append(f"{link.archive}: {members} members, {recorded} recorded: the archive is incomplete")
        if link.dir != export_dir:
            problem = manifest_problem(link.dir, link.checkpoint_id)
            if problem:
                problems.append(f"chain: {problem}")
    return problems


def restore(export: Export, name: str, dest: Path) -> str:
    """Extract the chain ending at ``export`` into the empty directory ``dest``."""
    export_dir = Path(export.path or Path(export.ref).parent)
    links = chain_of(export_dir, name)
    for link in links:  # every checksum first: nothing is extracted from a corrupt chain
        problem = _check_sum(link)
        if problem:
            raise BackendError(f"refusing to restore: {problem}", backend=NAME)
    dest = Path(os.path.abspath(dest))
    created = common.prepare_restore_dir(dest, NAME)
    state = ScanState()
    try:
        for link in links:
            try:
                scan(link.archive, link.compress.read, state)
            except UnsafeArchive as exc:
                raise BackendError(f"refusing to restore {link.archive}: {exc}", backend=NAME) from exc
            argv = [
                tool("tar", NAME),
                "--extract",
                f"--file={link.archive}",
                f"--directory={dest}",
                *EXTRACT_FLAGS,
                *link.compress.read,
            ]
            if link.info.get("incremental"):
                argv.append("--listed-incremental=/dev/null")
            run(argv, target=None, backend=NAME, what=f"extracting {link.archive}")
    except BaseException:
        common.empty_restore_dir(dest, created)
        raise
    levels = f"levels 0-{len(links) - 1}" if len(links) > 1 else "level 0"
    return f"restored {len(links)} archive(s) ({levels}) from {export_dir} into {dest}"
