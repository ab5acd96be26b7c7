"""The conformance kit run against the tar and rsync exporters (with the fsfreeze imager).

The exports go to a second loop filesystem made for the test, never to the host's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapcore.contract import BackendContract
from snapcore.testing import LoopFactory


class _ExporterContract(BackendContract):
    imager = "fsfreeze"
    dest: Path

    def make_mount(self, loop_fs: LoopFactory) -> Path:
        self.dest = loop_fs("ext4").mount_point / "exports"
        self.dest.mkdir()
        return super().make_mount(loop_fs)

    def backend_options(self, tmp_path: Path) -> dict[str, dict[str, Any]]:
        assert self.exporter is not None
        return {self.exporter: {"dest": str(self.dest)}}


class TestTarContract(_ExporterContract):
    exporter = "tar"


class TestRsyncContract(_ExporterContract):
    exporter = "rsync"
