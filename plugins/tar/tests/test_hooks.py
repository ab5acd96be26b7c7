"""The hooks of ``tar`` and ``rsync``: one class, two instances, as the entry points load them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import snapcore
from snapcore import BackendError, Export, find_mount, make_plugins
from snapcore_tar import hooks


def _target(exporter: str, options: dict[str, object]) -> snapcore.Target:
    return snapcore.Target(
        checkpoint_id="c1", mount=find_mount("/"), imager="none", exporter=exporter, options={exporter: options}
    )


def test_the_entry_points_load_the_two_exporters() -> None:
    """rsync's class adds what travels beside a remote tree (put/get) to the shared hooks."""
    plugins = make_plugins()
    assert not [b for b in plugins.broken if b.name in ("tar", "rsync")]
    tar, rsync = plugins.pm.get_plugin("tar"), plugins.pm.get_plugin("rsync")
    assert (tar, rsync) == (hooks.tar, hooks.rsync)
    assert type(tar) is hooks.ExporterHooks and type(rsync) is hooks.RsyncHooks
    assert isinstance(rsync, hooks.ExporterHooks)
    assert plugins.implements("rsync", "snapcore_export_put") and not plugins.implements("tar", "snapcore_export_put")
    assert plugins.info("tar").name == "tar" and plugins.info("rsync").name == "rsync"
    assert plugins.backends["tar"].distribution == plugins.backends["rsync"].distribution == "snapcore-tar"
    assert [o.name for o in plugins.option_schema("tar")] == ["dest", "compress", "incremental", "full_every"]
    assert [o.name for o in plugins.option_schema("rsync")] == [
        "dest",
        "rsh",
        "password_file",
        "timeout",
        "precopy",
        "precopy_until",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="snapcore checks a plugin's file only when run as root")
def test_the_instances_are_refused_from_a_directory_others_can_write(tmp_path: Path) -> None:
    """The check judges an object plugin by its entry point's module (an object has no
    ``__file__``: it would otherwise pass)."""
    site = tmp_path / "site"
    shutil.copytree(Path(hooks.__file__).parent, site / "snapcore_tar", ignore=shutil.ignore_patterns("__pycache__"))
    dist = site / "snapcore_tar-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: snapcore-tar\nVersion: 0.1.0\n")
    # as plugins/tar/pyproject.toml declares them
    entry_points = "[snapcore]\nrsync = snapcore_tar.hooks:rsync\ntar = snapcore_tar.hooks:tar\n"
    (dist / "entry_points.txt").write_text(entry_points)
    (site / "snapcore_tar").chmod(0o777)
    code = (
        "from snapcore import make_plugins\n"
        "p = make_plugins()\n"
        "print(sorted(p.names()), sorted((b.name, 'is writable by others' in b.error) for b in p.broken))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "SNAPCORE_PLUGINS": "tar,rsync"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "['none'] [('rsync', True), ('tar', True)]"


@pytest.mark.parametrize(
    ("name", "options", "refusal"),
    [
        ("tar", {"dest": "/backup"}, "tar, /: a tar export is restored into a new, empty directory"),
        ("rsync", {"dest": "rsync://host/m"}, "rsync, /: an rsync export is restored into a new, empty directory"),
    ],
)
def test_restore_refusals_name_their_backend(name: str, options: dict[str, object], refusal: str) -> None:
    plugin = getattr(hooks, name)
    target = _target(name, options)
    export = Export(backend=name, ref="/nowhere/c1/x", path="/nowhere/c1", details={})
    with pytest.raises(BackendError, match=f"^{name}, /: this checkpoint has no {name} export to restore$"):
        plugin.snapcore_restore(target=target, export=None, dest=Path("/tmp/x"), in_place=False)
    for dest, in_place in ((Path("/tmp/x"), True), (None, False)):
        with pytest.raises(BackendError, match=f"^{refusal} \\(--to DIR\\), never in place$"):
            plugin.snapcore_restore(target=target, export=export, dest=dest, in_place=in_place)


def test_each_instance_leaves_the_other_backends_exports_alone() -> None:
    target = _target("tar", {"dest": "/backup"})
    rsync_export = Export(backend="rsync", ref="/nowhere/c1/x", path="/nowhere/c1", details={})
    assert hooks.tar.snapcore_verify(target=target, export=rsync_export) == []
    hooks.tar.snapcore_discard(target=target, export=rsync_export)  # not tar's: nothing to do, nothing raised


def test_a_tar_target_without_dest_is_refused_before_the_freeze() -> None:
    with pytest.raises(BackendError, match=r"no dest: set options\.tar\.dest to an absolute path"):
        hooks.tar.snapcore_prepare(target=_target("tar", {}), role=snapcore.Role.EXPORTER)


def test_a_remote_rsync_dest_is_no_local_directory() -> None:
    """before_freeze checks only a local dest against the frozen filesystems."""
    remote = _target("rsync", {"dest": "rsync://backup.example:873/snap/app"})
    assert hooks.rsync.exporter.local_dest(remote) is None
    assert hooks.rsync.exporter.local_dest(_target("rsync", {"dest": "/backup/x/"})) == Path("/backup/x")
