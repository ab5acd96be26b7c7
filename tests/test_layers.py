"""The public surface: plugins (and their tests) import only ``snapcore`` itself,
``snapcore.testing`` and ``snapcore.contract``; everything else is internal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import snapcore

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ("snapcore", "snapcore.testing", "snapcore.contract")


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "snapcore":  # from snapcore import manifest: a module, not a name
                found += [(node.lineno, f"snapcore.{a.name}") for a in node.names if a.name not in snapcore.__all__]
    return found


def _internal(module: str) -> bool:
    if module != "snapcore" and not module.startswith("snapcore."):
        return False
    return not any(module == p or module.startswith(p + ".") for p in PUBLIC[1:]) and module != "snapcore"


def test_plugins_import_only_the_public_surface() -> None:
    files = sorted((ROOT / "plugins").rglob("*.py"))
    assert len(files) > 20
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in files
        for line, module in _imports(path)
        if _internal(module)
    ]
    assert not wrong, "plugins reach into snapcore's internals:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", snapcore.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(snapcore, name) is not None


def test_the_check_catches_an_internal_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from snapcore.store.manifest import load\nimport snapcore.policy\nfrom snapcore import records\n")
    assert [m for _, m in _imports(bad) if _internal(m)] == [
        "snapcore.store.manifest",
        "snapcore.policy",
        "snapcore.records",
    ]
