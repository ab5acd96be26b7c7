from __future__ import annotations

import os

import pytest

from snapcore.testing.processes import holder  # noqa: F401  (a fixture)


@pytest.fixture(autouse=True)
def core_backends_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core's tests run with the core's plugins and fsfreeze alone, whatever else
    is installed: other backends are tested by their own distributions. (Each test's
    own run directory comes from snapcore.testing's ``run_dir``.)"""
    monkeypatch.setenv("SNAPCORE_PLUGINS", "fsfreeze")


@pytest.fixture
def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
