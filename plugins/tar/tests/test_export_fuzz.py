"""A fuzzer for what travels with an export: whatever its ``manifest.json`` copy and
``<slug>.export.json`` say, and whatever sits in place of its files, ``verify
--from`` and ``restore --from --to DIR`` answer 0, 1 or 2: they refuse or stay
inside DIR, never hang (a hard alarm), never show a traceback (an exception other
than the CLI's own would escape ``main``).

The export is a real tar (or rsync) export of a small tree, made once per test; each example
copies it, mutates fields (paths, types, sizes) and files (FIFOs, symlinks, devices,
directories), then runs both commands. ``derandomize=True`` keeps CI stable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tar_helpers import exporter_policy

import snapcore
from snapcore import main
from snapcore.testing import LoopFactory, machine_pace

PATHS = [
    "/etc/shadow", "/dev/zero", "../outside/x", "..", ".", "", "a/../../b", "/", "data", "data.tar",
    "x\ny", "x\x00y", "data.tar.sha256", "manifest.json", "./data.tar", "/proc/self/environ", "\u2028",
]  # fmt: skip
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(PATHS),
    st.lists(st.sampled_from(PATHS), max_size=3),
    st.dictionaries(st.sampled_from(["slug", "archive", "ref"]), st.sampled_from(PATHS), max_size=2),
)
#: (file, key path) of the fields a mutation may change.
FIELDS = [
    ("export.json", ("archive",)),
    ("export.json", ("slug",)),
    ("export.json", ("chain",)),
    ("export.json", ("level",)),
    ("export.json", ("compress",)),
    ("export.json", ("sha256",)),
    ("export.json", ("checkpoint_id",)),
    ("export.json", ("incremental",)),
    ("export.json", ("tree",)),
    ("export.json", ("file_list",)),
    ("export.json", ("link_dest",)),
    ("export.json", ("backend",)),
    ("manifest.json", ("id",)),
    ("manifest.json", ("outcome",)),
    ("manifest.json", ("targets",)),
    ("manifest.json", ("targets", 0, "mount")),
    ("manifest.json", ("targets", 0, "exporter")),
    ("manifest.json", ("targets", 0, "export_record")),
    ("manifest.json", ("targets", 0, "export_record", "details")),
    ("manifest.json", ("targets", 0, "export_record", "details", "slug")),
    ("manifest.json", ("targets", 0, "export_record", "details", "archive")),
    ("manifest.json", ("targets", 0, "export_record", "path")),
    ("manifest.json", ("targets", 0, "export_record", "ref")),
]
FILE_KINDS = ["fifo", "dev-zero", "dir", "symlink-out", "empty", "huge-sparse", "missing"]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        if (isinstance(doc, dict) and key in doc) or (
            isinstance(doc, list) and isinstance(key, int) and key < len(doc)
        ):
            doc = doc[key]
        else:
            return
    if isinstance(doc, dict) or (isinstance(doc, list) and isinstance(path[-1], int) and path[-1] < len(doc)):
        doc[path[-1]] = value


def _replace(path: Path, kind: str, outside: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "dir":
        path.mkdir()
    elif kind == "symlink-out":
        path.symlink_to(outside / "secret")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge-sparse":
        # over every cap on records and manifests (256 MiB), yet quick to hash as an
        # archive: a big archive is legitimate, only slow
        with open(path, "wb") as f:
            f.truncate(300 << 20)


class _Hang(Exception):
    pass


def _hang(signum: int, frame: FrameType | None) -> None:
    raise _Hang("verify or restore hung")


@pytest.fixture(scope="module", params=["tar", "rsync"])
def made_export(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Path, Path]]:
    """A real export of a small tree, on a loop filesystem: (export dir, fs root)."""
    if os.geteuid() != 0:
        pytest.skip("loop filesystems need root")
    loops = LoopFactory(tmp_path_factory.mktemp("fuzz"))
    try:
        src, out = loops("ext4"), loops("ext4", size_mb=64)
        (src.mount_point / "a.txt").write_text("a\n")
        (src.mount_point / "dir").mkdir()
        (src.mount_point / "dir" / "b.txt").write_text("b\n")
        dest = out.mount_point / "exports"
        dest.mkdir()
        state = out.mount_point / "state"
        policy = exporter_policy(out.mount_point, src.mount_point, request.param, {"dest": str(dest)})
        snapcore.checkpoint(policy=policy, state_dir=state, checkpoint_id="fz")
        (out.mount_point / "outside").mkdir()
        (out.mount_point / "outside" / "secret").write_text("secret\n")
        yield dest / "fz", out.mount_point
    finally:
        loops.close()


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    edits=st.lists(st.tuples(st.sampled_from(FIELDS), values), max_size=3),
    swap=st.one_of(
        st.none(),
        st.tuples(st.sampled_from(["copy", "sidecar", "export.json", "manifest.json"]), st.sampled_from(FILE_KINDS)),
    ),
)
def test_verify_and_restore_refuse_or_stay_inside(
    made_export: tuple[Path, Path],
    edits: list[tuple[tuple[str, tuple[Any, ...]], Any]],
    swap: tuple[str, str] | None,
) -> None:
    original, root = made_export
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    export = work / "fz"
    shutil.copytree(original, export, symlinks=True)
    info_name = next(p.name for p in export.iterdir() if p.name.endswith(".export.json"))
    slug = info_name[: -len(".export.json")]
    # the copy itself (a tar archive, an rsync tree) and what checks it (checksum, file list)
    is_tar = (export / f"{slug}.tar").exists()
    copy, sidecar = (f"{slug}.tar", f"{slug}.tar.sha256") if is_tar else (slug, f"{slug}.files")
    docs = {
        "export.json": json.loads((export / info_name).read_text()),
        "manifest.json": json.loads((export / "manifest.json").read_text()),
    }
    for (file, path), value in edits:
        _set(docs[file], path, value)
    (export / info_name).write_text(json.dumps(docs["export.json"]))
    (export / "manifest.json").write_text(json.dumps(docs["manifest.json"]))
    if swap is not None:
        which, kind = swap
        name = {"copy": copy, "sidecar": sidecar, "export.json": info_name, "manifest.json": "manifest.json"}[which]
        _replace(export / name, kind, root / "outside")
    outside_before = sorted(p.name for p in (root / "outside").iterdir())
    dest = work / "restored"
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(max(10, int(machine_pace().seconds(10))))
    try:
        assert main(["--state-dir", str(work / "state"), "verify", "--from", str(export)]) in (0, 1, 2)
        code = main(["--state-dir", str(work / "state"), "restore", "--from", str(export), "--to", str(dest)])
        assert code in (0, 1, 2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert sorted(p.name for p in (root / "outside").iterdir()) == outside_before
    assert (root / "outside" / "secret").read_text() == "secret\n"
    # whatever was restored is inside DEST, and nothing in it leads out
    for dirpath, dirnames, filenames in os.walk(work):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() and dest in p.parents:
                assert not os.path.realpath(p).startswith(str(root / "outside")) or code != 0
    if code == 0:
        assert (dest / "a.txt").read_text() == "a\n"
