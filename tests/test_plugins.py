"""Loading, broken plugins, and the one-backend-only calling rule."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest

from snapcore import BackendInfo, Mount, Role, Support, hookimpl, hookspecs
from snapcore.cli import main
from snapcore.errors import PluginError
from snapcore.plugins import default_plugins, make_plugins

MOUNT = Mount(
    mount_id=1,
    parent_id=0,
    major=8,
    minor=1,
    root="/",
    mount_point="/srv",
    mount_options=("rw",),
    fstype="ext4",
    source="/dev/sda1",
    super_options=(),
)


class Named:
    def __init__(self, name: str, score: int) -> None:
        self.name = name
        self.score = score
        self.probed = 0

    @hookimpl
    def snapcore_backend_info(self) -> BackendInfo:
        return BackendInfo(name=self.name, roles=frozenset({Role.IMAGER}), description=self.name)

    @hookimpl
    def snapcore_probe(self, mount: Mount) -> Support:
        self.probed += 1
        return Support.yes(f"{self.name} can", score=self.score)


def test_probe_is_asked_of_one_backend_at_a_time() -> None:
    plugins = make_plugins(entry_points=False)
    a, b = Named("a", 10), Named("b", 20)
    plugins.register(a, "a")
    plugins.register(b, "b")
    assert plugins.probe("a", MOUNT) == Support.yes("a can", score=10)
    assert (a.probed, b.probed) == (1, 0)
    assert plugins.names(Role.IMAGER) == ["a", "b", "none"]


def test_backend_name_must_match_registration() -> None:
    plugins = make_plugins(entry_points=False)
    with pytest.raises(PluginError, match="must equal its entry-point name"):
        plugins.register(Named("other", 1), "mine")
    assert not plugins.pm.has_plugin("mine")


def test_misspelled_hookimpl_is_refused() -> None:
    class Typo:
        @hookimpl
        def snapcore_freez(self) -> None:
            return None

    plugins = make_plugins(entry_points=False)
    with pytest.raises(PluginError, match="snapcore_freez"):
        plugins.register(Typo(), "typo")


def test_duplicate_name_is_refused() -> None:
    plugins = make_plugins(entry_points=False)
    with pytest.raises(PluginError, match=r"already registered|taken"):
        plugins.register(Named("none", 1), "none")


def _fake_distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    dist = root / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[snapcore]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


@pytest.fixture
def fake_dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _fake_distribution(
        tmp_path,
        "snapcore-broken",
        {"broken": "broken_backend"},
        {"broken_backend": "raise ImportError('libfoo.so.1: cannot open shared object file')\n"},
    )
    _fake_distribution(
        tmp_path,
        "snapcore-good",
        {"good": "good_backend"},
        {
            "good_backend": (
                "from snapcore import BackendInfo, Role, Support, hookimpl\n"
                "@hookimpl\n"
                "def snapcore_backend_info():\n"
                "    return BackendInfo(name='good', roles=frozenset({Role.EXPORTER}), description='third party')\n"
            )
        },
    )
    monkeypatch.delenv("SNAPCORE_PLUGINS")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("broken_backend", "good_backend"):
        sys.modules.pop(mod, None)
    return tmp_path


def test_broken_plugin_is_reported_not_fatal(fake_dists: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugins = make_plugins()
    assert "good" in plugins.backends
    assert plugins.backends["good"].distribution == "snapcore-good"
    broken = {b.name: b for b in plugins.broken}
    assert "libfoo.so.1" in broken["broken"].error
    assert broken["broken"].distribution == "snapcore-broken"
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in data["backends"]} >= {"fsfreeze", "none", "good"}
    assert data["broken"][0]["name"] == "broken"
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "BROKEN" in out and "libfoo.so.1" in out
    assert "unknown backend" not in PluginError(plugins.unknown_message("broken")).args[0]


def test_allowlist_and_disable(fake_dists: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,good")
    plugins = make_plugins()
    assert set(plugins.backends) == {"fsfreeze", "good", "none"}
    assert plugins.broken == []
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze,good,broken")
    plugins = make_plugins(disabled=["fsfreeze", "broken"])
    assert "fsfreeze" not in plugins.backends and "good" in plugins.backends and plugins.broken == []


def test_default_plugins_are_built_once_and_anew_when_the_installation_changes(
    fake_dists: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = default_plugins()
    assert default_plugins() is first and "good" in first.backends
    _fake_distribution(
        fake_dists,
        "snapcore-later",
        {"later": "later_backend"},
        {
            "later_backend": (
                "from snapcore import BackendInfo, Role, hookimpl\n"
                "@hookimpl\n"
                "def snapcore_backend_info():\n"
                "    return BackendInfo(name='later', roles=frozenset({Role.EXPORTER}), description='later')\n"
            )
        },
    )
    monkeypatch.delitem(sys.modules, "later_backend", raising=False)
    second = default_plugins()  # a distribution appeared on sys.path: found
    assert second is not first and "later" in second.backends
    assert default_plugins() is second
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze")
    third = default_plugins()
    assert set(third.backends) == {"fsfreeze", "none"}
    monkeypatch.undo()  # sys.path and the environment as before the fixture: no fake dists
    assert "later" not in default_plugins().backends


def test_every_hookspec_is_documented() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    specs = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("snapcore_")]
    assert len(specs) >= 14
    for name in specs:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "**When**" in doc, name
        assert "**Raises**" in doc or "**Must" in doc, name
        assert f"`{name}" in readme, f"{name} is not in the README's hook table"
