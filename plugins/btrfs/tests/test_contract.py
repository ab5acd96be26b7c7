"""The conformance kit run against the btrfs imager and the btrfs-send exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapcore.contract import BackendContract


class TestBtrfsContract(BackendContract):
    imager = "btrfs"
    fstype = "btrfs"


class TestBtrfsSendContract(BackendContract):
    imager = "btrfs"
    exporter = "btrfs-send"
    fstype = "btrfs"

    def backend_options(self, tmp_path: Path) -> dict[str, dict[str, Any]]:
        dest = tmp_path / "streams"
        dest.mkdir()
        return {"btrfs-send": {"dest": str(dest)}}
