"""What keeps the CLI's start short must not change what it does.

The entry-point scan against importlib.metadata, lazily imported backends against
pluggy's discovery, the one-command parser against the whole one, device facts
from sysfs against pyudev, and the lock names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points as metadata_entry_points
from pathlib import Path

import pytest

from snapcore import hookimpl
from snapcore.cli import build_parser, command_of, parse_args
from snapcore.cli.commands import COMMANDS
from snapcore.entrypoints import entry_points
from snapcore.errors import UsageError
from snapcore.host.fsutil import block_devnum
from snapcore.host.locks import lock_name
from snapcore.host.mounts import MountTable, _sysfs_facts, _udev_facts, enrich
from snapcore.plugins import make_plugins
from snapcore.testing import LoopFactory


@pytest.mark.parametrize("group", ["snapcore", "console_scripts", "pytest11"])
def test_entry_points_match_importlib_metadata(group: str) -> None:
    ours = sorted((e.name, e.value, e.dist_name, e.dist_version) for e in entry_points(group))
    theirs = sorted(
        (e.name, e.value, e.dist.name if e.dist else "unknown", e.dist.version if e.dist else "")
        for e in metadata_entry_points(group=group)
    )
    assert ours == theirs
    if group == "snapcore":
        assert {"btrfs", "btrfs-send", "dm", "fsfreeze", "rsync", "tar"} <= {e[0] for e in ours}


def _dist(root: Path, dirname: str, name: str, version: str, text: str) -> None:
    dist = root / dirname
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nbody\nName: no\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(text))


def test_entry_points_first_on_path_wins_and_extras_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _dist(first, "Some_Thing-1.0.dist-info", "Some_Thing", "1.0", "[snapcore]\nx = mod_x:hooks [extra]\n")
    _dist(second, "some.thing-2.0.dist-info", "some.thing", "2.0", "[snapcore]\ny = mod_y\n")
    _dist(
        second,
        "other-3.0.dist-info",
        "other",
        "3.0",
        "# comment\n[other]\nz = no\n[snapcore]\n# note\nw = w.mod:attr\n",
    )
    (second / "lone.egg-info").write_text("Name: lone\n")  # a PKG-INFO file, no entry points
    monkeypatch.setattr(sys, "path", [str(first), str(second), str(tmp_path / "missing")])
    ours = [(e.name, e.value, e.dist_name, e.dist_version) for e in entry_points("snapcore")]
    theirs = [(e.name, e.value, e.dist.name, e.dist.version) for e in metadata_entry_points(group="snapcore") if e.dist]
    assert (
        sorted(ours)
        == sorted(theirs)
        == [("w", "w.mod:attr", "other", "3.0"), ("x", "mod_x:hooks [extra]", "Some_Thing", "1.0")]
    )


def test_entry_point_load_strips_extras_and_walks_attributes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "epmod.py").write_text("class A:\n    class B:\n        value = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _dist(tmp_path, "epmod-1.dist-info", "epmod", "1", "[snapcore]\ne = epmod:A.B [x]\n")
    (ep,) = [e for e in entry_points("snapcore") if e.name == "e"]
    assert ep.load().value == 42


def test_a_zip_on_sys_path_falls_back_to_importlib_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: zipped\nVersion: 1.0\n")
        z.writestr("zipped-1.0.dist-info/entry_points.txt", "[snapcore]\nzipped = zipped_mod\n")
    monkeypatch.setattr(sys, "path", [str(archive)])
    assert [(e.name, e.dist_name) for e in entry_points("snapcore")] == [("zipped", "zipped")]


def test_lazy_backend_modules_stay_unloaded_until_a_hook_runs() -> None:
    code = textwrap.dedent(
        """
        import sys
        from snapcore.plugins import make_plugins
        plugins = make_plugins()
        assert not plugins.broken, plugins.broken
        heavy = ["snapcore_dm.backend", "snapcore_dm.devices", "snapcore_dm.restore", "snapcore_tar.tar_format",
                 "snapcore_tar.tar_export", "snapcore_tar.tar_restore", "snapcore_tar.rsync_dest",
                 "snapcore_tar.rsync_export", "snapcore_tar.rsync_files", "snapcore_tar.rsync_restore",
                 "snapcore_tar.safety", "snapcore_tar.runner", "snapcore_btrfs.send", "snapcore_btrfs.subvol",
                 "snapcore_btrfs.markers", "snapcore_btrfs.snapshot", "snapcore_btrfs.images",
                 "snapcore_btrfs.restore", "snapcore_btrfs.rollback", "snapcore_tar.common", "btrfsutil", "yaml",
                 "importlib.metadata"]
        print(sorted(m for m in heavy if m in sys.modules and type(sys.modules[m]).__name__ != "_LazyModule"))
        from snapcore import Mount
        mount = Mount(mount_id=1, parent_id=0, major=8, minor=1, root="/", mount_point="/srv",
                      mount_options=("rw",), fstype="ext4", source="/dev/nonexistent", super_options=())
        assert not plugins.probe("dm", mount).ok
        assert not plugins.probe("btrfs", mount).ok
        print(sorted(m for m in heavy if m in sys.modules and type(sys.modules[m]).__name__ != "_LazyModule"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.splitlines()
    assert out == ["[]", "[]"], out


def test_a_lazy_hooks_module_still_gets_its_hooks_and_loads_on_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lazyheavy.py").write_text("LOADED = True\ndef answer():\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from snapcore import lazy_import

    heavy = lazy_import("lazyheavy")

    import types

    plugin = types.ModuleType("lazyplugin")
    plugin.heavy = heavy  # type: ignore[attr-defined]

    @hookimpl
    def snapcore_checkpoint_end(checkpoint: object, outcome: object, manifest: object) -> None:
        plugin.seen = heavy.answer()  # type: ignore[attr-defined]

    plugin.snapcore_checkpoint_end = snapcore_checkpoint_end  # type: ignore[attr-defined]
    plugins = make_plugins(entry_points=False)
    plugins.register(plugin, "lazyplugin")
    assert type(sys.modules["lazyheavy"]).__name__ == "_LazyModule"  # registering did not load it
    plugins.pm.hook.snapcore_checkpoint_end(checkpoint=None, outcome=None, manifest=None)
    assert plugin.seen == "yes"
    sys.modules.pop("lazyheavy", None)


@pytest.mark.parametrize(
    "argv",
    [
        ["checkpoint", "/srv", "--id", "x", "--json"],
        ["--state-dir", "/s", "-q", "checkpoint", "/a", "/b", "--pid", "12"],
        ["--run-dir=/r", "list", "--json"],
        ["--disable-plugin", "dm", "show", "abc"],
        ["restore", "abc", "--to", "/x", "--mount", "/m"],
        ["policy", "check", "f.yaml"],
        ["-v", "-v", "verify", "--from", "/e"],
        ["recover"],
        ["--state", "list", "checkpoint", "/srv"],  # an abbreviation that fools the guess
    ],
)
def test_the_one_command_parser_parses_like_the_whole_one(argv: list[str]) -> None:
    assert parse_args(argv) == build_parser().parse_args(argv)


def test_the_guess_is_none_when_unsure() -> None:
    assert command_of(["--help"]) is None
    assert command_of(["--state-dir", "list"]) is None  # 'list' is the option's value
    assert command_of(["nosuch"]) is None
    assert command_of(["--state-dir", "/s", "plan", "/x"]) == "plan"
    help_text = build_parser().format_help()
    assert all(name in help_text for name in COMMANDS)


def test_a_usage_error_reads_the_same_with_the_one_command_parser() -> None:
    with pytest.raises(UsageError) as partial:
        parse_args(["checkpoint", "--nosuch"])
    with pytest.raises(UsageError) as whole:
        build_parser().parse_args(["checkpoint", "--nosuch"])
    assert str(partial.value) == str(whole.value)


def test_device_facts_from_sysfs_match_pyudev(loop_fs: LoopFactory) -> None:
    fs = loop_fs("ext4")
    table = MountTable.read()
    mount = table.find(fs.mount_point)
    devnum = block_devnum(mount)
    assert devnum is not None
    assert _sysfs_facts(devnum) == _udev_facts(devnum)
    fast = enrich(mount)
    assert fast.devnode == fs.device
    assert fast.loop_backing_file and os.path.samefile(fast.loop_backing_file, fs.image)


@pytest.mark.parametrize(
    ("mount_point", "name"),
    [
        ("/", "-"),
        ("/var/lib", "var-lib"),
        ("/srv/a-b c", "srv-a\\x2db\\x20c"),
        ("/x/.hidden", "x-.hidden"),
        ("/.top", "\\x2etop"),
        ("/é", "\\xc3\\xa9"),
        ("/back\\slash", "back\\x5cslash"),
    ],
)
def test_lock_names_are_readable_and_distinct(mount_point: str, name: str) -> None:
    assert lock_name(mount_point) == name


def test_long_lock_names_are_digests() -> None:
    a, b = lock_name("/" + "a" * 300), lock_name("/" + "a" * 299 + "b")
    assert a != b and len(a) < 100 and a.startswith("long-")


@pytest.mark.parametrize("argv", [["list"], ["show", "--help"], ["checkpoint", "--help"], ["restore", "--help"]])
def test_the_etcd_client_is_loaded_only_by_the_cluster_commands(argv: list[str], tmp_path: Path) -> None:
    """gRPC and aetcd cost ~80 ms: ``agent`` and ``checkpoint``/``restore --cluster`` load
    them, no other command does."""
    code = (
        "import sys\nfrom snapcore.cli import main\n"
        f"try:\n    main(['--state-dir', {str(tmp_path)!r}, *{argv!r}])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aetcd', 'grpc', 'asyncio')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
