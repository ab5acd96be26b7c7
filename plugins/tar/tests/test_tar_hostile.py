"""Hostile archives: restore never writes outside its directory, for any archive.

The archives are crafted with Python's tarfile (snapcore never makes such things),
wrapped in an export directory with a valid checksum and manifest (an attacker can
compute those too), and restored with ``snapcore restore --from``. Every escape
would land inside a loop filesystem the test made, never on the host.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from snapcore import Manifest, TargetRecord, main
from snapcore.testing import LoopFactory
from snapcore_tar.safety import ScanState, UnsafeArchive, scan_listing

Builder = Callable[[tarfile.TarFile, Path], None]


def _add(
    t: tarfile.TarFile,
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"pwned\n",
    link: str = "",
    pax: dict[str, str] | None = None,
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if pax:
        info.pax_headers = pax
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    else:
        t.addfile(info)


def craft_export(root: Path, cid: str, builders: list[Builder], outside: Path, incremental: bool = False) -> Path:
    """An export directory chain ``root/<cid>-N`` with archives made by ``builders``."""
    slug = "data"
    chain = [f"{cid}-{i}" for i in range(len(builders))]
    for i, build in enumerate(builders):
        d = root / chain[i]
        d.mkdir(parents=True)
        archive = d / f"{slug}.tar"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as t:
            build(t, outside)
        sha = hashlib.sha256(archive.read_bytes()).hexdigest()
        (d / f"{slug}.tar.sha256").write_text(f"{sha}  {archive.name}\n")
        info = {
            "format": 1,
            "backend": "tar",
            "checkpoint_id": chain[i],
            "mount": "/data",
            "slug": slug,
            "archive": archive.name,
            "sha256": sha,
            "compress": "none",
            "incremental": incremental,
            "level": i,
            "chain": chain[: i + 1],
        }
        (d / f"{slug}.export.json").write_text(json.dumps(info))
        record = TargetRecord(
            mount="/data",
            source="/dev/x",
            fstype="ext4",
            imager="fsfreeze",
            exporter="tar",
            outcome="ok",
            export=str(archive),
            export_record={"backend": "tar", "ref": str(archive), "path": str(d), "details": {"slug": slug}},
        )
        manifest = Manifest(id=chain[i], outcome="ok", started="2026-11-25T00:00:00Z", targets=[record])
        (d / "manifest.json").write_text(manifest.dumps())
    return root / chain[-1]


def _abs_name(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "ok.txt")
    _add(t, str(outside / "abs-pwned"))


def _dotdot(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "../../outside/dotdot-pwned")


def _dotdot_inside(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "a/", tarfile.DIRTYPE)
    _add(t, "a/../../../outside/inner-pwned")


def _through_symlink(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "lnk", tarfile.SYMTYPE, link=str(outside))
    _add(t, "lnk/symlink-pwned")


def _through_relative_symlink(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "sub/", tarfile.DIRTYPE)
    _add(t, "sub/up", tarfile.SYMTYPE, link="../../../outside")
    _add(t, "sub/up/rel-pwned")


def _hardlink_absolute(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "hl", tarfile.LNKTYPE, link=str(outside / "victim"))


def _hardlink_dotdot(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "hl", tarfile.LNKTYPE, link="../../outside/victim")


def _hardlink_through_symlink(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "s", tarfile.SYMTYPE, link=str(outside))
    _add(t, "h", tarfile.LNKTYPE, link="s/victim")


def _symlink_as_top(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, ".", tarfile.SYMTYPE, link=str(outside))


def _dumpdir_rename_out(t: tarfile.TarFile, outside: Path) -> None:
    # GNU tar renames R → T while extracting an incremental archive
    _add(t, "./", tarfile.DIRTYPE, pax={"GNU.dumpdir": "R../../outside/victim-dir\0T./stolen\0\0"})


def _chain_base_symlink(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "x", tarfile.SYMTYPE, link=str(outside))


def _chain_base_symlink_extreme_mtime(t: tarfile.TarFile, outside: Path) -> None:
    # GNU tar prints this date as one token: a line the scanner's pattern does not fit
    _add(t, "x", tarfile.SYMTYPE, link=str(outside), pax={"mtime": str(2**63 - 1)})


def _chain_write_through(t: tarfile.TarFile, outside: Path) -> None:
    _add(t, "x/chain-pwned")


CASES: dict[str, tuple[list[Builder], str]] = {
    "absolute-name": ([_abs_name], "absolute name"),
    "dotdot": ([_dotdot], "'..' component"),
    "dotdot-inside": ([_dotdot_inside], "'..' component"),
    "through-symlink": ([_through_symlink], "through the symlink"),
    "through-relative-symlink": ([_through_relative_symlink], "through the symlink"),
    "hardlink-absolute": ([_hardlink_absolute], "from hard link targets"),
    "hardlink-dotdot": ([_hardlink_dotdot], "from hard link targets"),
    "hardlink-through-symlink": ([_hardlink_through_symlink], "goes through the symlink"),
    "symlink-as-top": ([_symlink_as_top], "top directory"),
    "dumpdir-rename-out": ([_dumpdir_rename_out], "outside the directory"),
    "chain-symlink-then-write": ([_chain_base_symlink, _chain_write_through], "through the symlink"),
    "chain-unreadable-line-then-write": ([_chain_base_symlink_extreme_mtime, _chain_write_through], "cannot read"),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems need root")
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_archive_is_refused(loop_fs: LoopFactory, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    fs = loop_fs("ext4")
    root = fs.mount_point
    outside = root / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious\n")
    (outside / "victim-dir").mkdir()
    builders, message = CASES[case]
    export_dir = craft_export(
        root / "exports", "evil", builders, outside, incremental=case.startswith(("dumpdir", "chain"))
    )
    restored = root / "r" / "deep" / "restored"
    before = sorted(str(p) for p in outside.rglob("*"))

    assert main(["restore", "--from", str(export_dir), "--to", str(restored)]) == 1
    err = capsys.readouterr().err
    assert "refusing" in err and message in err, err
    assert sorted(str(p) for p in outside.rglob("*")) == before, "nothing written outside"
    assert (outside / "victim").read_text() == "precious\n"
    assert not restored.exists() or not any(restored.iterdir()), "nothing left half-restored"
    assert not list(root.rglob("*pwned*"))
    # verify says why, too
    assert main(["verify", "--from", str(export_dir)]) == 1
    assert "unsafe to restore" in capsys.readouterr().out


def _lines(*lines: str) -> list[str]:
    return list(lines)


def test_listing_parser_reads_quoted_names_and_split_records() -> None:
    state = ScanState()
    scan_listing(
        _lines(
            'drwxr-xr-x 0/0               0 2026-11-25 14:15 "./"',
            "D dir",
            "Y new",  # a name with a newline, printed raw by GNU tar over two lines
            "line",
            "",
            '-rw-r--r-- 0/0               2 2026-11-25 14:15 "./dir/new\\nline"',
            'lrwxrwxrwx 0/0               0 2026-11-25 14:15 "./arrow -> x" -> "y -> z"',
            'hrw-r--r-- 0/0               0 2026-11-25 14:15 "./h" link to "./dir/new\\nline"',
            'crw-r--r-- 0/0             1,3 2026-11-25 14:15 "./null"',
            '-rw-r--r-- 0/0               2 2026-11-25 14:15 "./caf\\303\\251"',
        ),
        state,
    )
    assert state.members == 6
    assert (b"arrow -> x",) in state.symlinks


@pytest.mark.parametrize(
    "line",
    [
        "R ./a\n/../../etc",
        "T ../x",
        "R /etc",
        '-rw-r--r-- 0/0 1 2026-11-25 14:15 "a/../../x"',
        'V--------- 0/0 0 2026-11-25 14:15 "label"',
        '-rw-r--r-- 0/0 1 2026-11-25 14:15 "x" trailing',
        '-rw-r--r-- 0/0 1 2026-11-25 14:15 "unterminated',
    ],
)
def test_listing_parser_refuses(line: str) -> None:
    with pytest.raises(UnsafeArchive):
        scan_listing(line.split("\n"), ScanState())


@pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems need root")
@pytest.mark.parametrize("mount", ["/../outside/mount-pwned", "/data/../../outside", "data", "/data", "/x/./y"])
def test_a_target_mount_that_leads_elsewhere_is_refused(
    loop_fs: LoopFactory, mount: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The manifest copy's ``mount`` fields name where each target goes under --to DIR:
    a second target whose mount climbs out (or repeats the first) restores nothing."""
    fs = loop_fs("ext4")
    root = fs.mount_point
    outside = root / "outside"
    outside.mkdir()
    export_dir = craft_export(root / "exports", "two", [lambda t, _: _add(t, "ok.txt")], outside)
    copy = Manifest.from_json(json.loads((export_dir / "manifest.json").read_text()))
    second = TargetRecord.from_json({**copy.targets[0].to_json(), "mount": mount})
    copy.targets.append(second)
    (export_dir / "manifest.json").write_text(copy.dumps())
    restored = root / "restored"

    assert main(["restore", "--from", str(export_dir), "--to", str(restored)]) == 1
    err = capsys.readouterr().err
    assert "refusing" in err and repr(mount) in err, err
    assert not restored.exists() and list(outside.iterdir()) == []
    assert main(["verify", "--from", str(export_dir)]) == 1
    assert "refusing" in capsys.readouterr().err


def _set_archive(export_dir: Path, outside: Path) -> None:
    info_path = export_dir / "data.export.json"
    info = json.loads(info_path.read_text())
    info["archive"] = "/etc/shadow"
    info_path.write_text(json.dumps(info))


def _fifo_archive(export_dir: Path, outside: Path) -> None:
    (export_dir / "data.tar").unlink()
    os.mkfifo(export_dir / "data.tar")


def _zero_archive(export_dir: Path, outside: Path) -> None:
    (export_dir / "data.tar").unlink()
    (export_dir / "data.tar").symlink_to("/dev/zero")


def _fifo_record(export_dir: Path, outside: Path) -> None:
    (export_dir / "data.export.json").unlink()
    os.mkfifo(export_dir / "data.export.json")


def _slug_up(export_dir: Path, outside: Path) -> None:
    copy = Manifest.from_json(json.loads((export_dir / "manifest.json").read_text()))
    record = copy.targets[0].export_record or {}
    record["details"] = {"slug": "../outside/data"}
    (export_dir / "manifest.json").write_text(copy.dumps())


RECORD_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "archive-absolute": (_set_archive, "not a plain file name"),
    "archive-fifo": (_fifo_archive, "not a regular file"),
    "archive-dev-zero": (_zero_archive, "data.tar"),
    "record-fifo": (_fifo_record, "not a regular file"),
    "slug-up": (_slug_up, "not a plain file name"),
}


@pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems need root")
@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_record_fields_are_names_inside_the_export_never_paths(
    loop_fs: LoopFactory, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export record names files inside its export directory: an absolute path is
    never read or hashed (its digest would leak), a FIFO or device never waited on."""
    fs = loop_fs("ext4")
    root = fs.mount_point
    outside = root / "outside"
    outside.mkdir()
    export_dir = craft_export(root / "exports", "rec", [lambda t, _: _add(t, "ok.txt")], outside)
    shadow = hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest() if Path("/etc/shadow").exists() else None
    tamper, message = RECORD_CASES[case]
    tamper(export_dir, outside)
    restored = root / "restored"
    assert main(["verify", "--from", str(export_dir)]) == 1
    said = capsys.readouterr()
    assert message in said.out + said.err, said
    assert main(["restore", "--from", str(export_dir), "--to", str(restored)]) == 1
    said2 = capsys.readouterr()
    assert message in said2.out + said2.err, said2
    assert not restored.exists() or not any(restored.iterdir())
    assert list(outside.iterdir()) == []
    if shadow:
        assert shadow not in said.out + said.err + said2.out + said2.err


def _point_export_at(manifest: dict[str, object], victim_dir: Path, details: dict[str, str]) -> None:
    target = manifest["targets"][0]  # type: ignore[index]
    record = target["export_record"]
    record["path"] = str(victim_dir)
    record["ref"] = str(victim_dir / next(iter(details.values())))
    record["details"] = {**record["details"], **details, "dest": str(victim_dir.parent)}
    target["options"][target["exporter"]]["dest"] = str(victim_dir.parent)


@pytest.mark.skipif(os.geteuid() != 0, reason="loop filesystems need root")
@pytest.mark.parametrize("exporter", ["tar", "rsync"])
def test_delete_through_a_tampered_manifest_never_removes_what_snapcore_did_not_make(
    loop_fs: LoopFactory, tmp_path: Path, exporter: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state manifest points the export at a directory named like the checkpoint
    elsewhere: nothing there proves it is this checkpoint's export (no export.json of
    it), so ``delete`` removes nothing and says why."""
    import snapcore

    fs = loop_fs("ext4")
    fs.write("f.txt", "f")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    dest = tmp_path / "exports"
    dest.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"version: 1\nmounts:\n  {fs}:\n    imager: fsfreeze\n    exporter: {exporter}\n"
        f"    options: {{{exporter}: {{dest: {dest}}}}}\n"
    )
    snapcore.checkpoint(policy=policy, state_dir=state, checkpoint_id="d1")
    victim = tmp_path / "home" / "d1"  # named as the checkpoint, as its export dir would be
    victim.mkdir(parents=True)
    (victim / "important.txt").write_text("mine")
    (victim / "project").mkdir()
    (victim / "project" / "code.py").write_text("mine")
    path = state / "checkpoints" / "d1" / "manifest.json"
    manifest = json.loads(path.read_text())
    _point_export_at(manifest, victim, {"archive": "important.txt"} if exporter == "tar" else {"slug": "project"})
    path.write_text(json.dumps(manifest))
    capsys.readouterr()

    assert main(["--state-dir", str(state), "delete", "d1"]) == 1

    said = capsys.readouterr()
    assert "proves it is checkpoint d1's" in said.out + said.err
    assert (victim / "important.txt").read_text() == "mine"
    assert (victim / "project" / "code.py").read_text() == "mine"
    assert (dest / "d1").is_dir(), "the real export stays until a manifest that names it is deleted"
