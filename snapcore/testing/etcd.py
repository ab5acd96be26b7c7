"""A real etcd server for tests (Debian's ``etcd-server``), one member, in a network
namespace of the test's (a :class:`~snapcore.testing.nodes.Nodes` hub) or on
loopback; stopped and its data removed by :meth:`EtcdServer.close`."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

#: How long a start may take: ~0.6 s measured here, a slower machine several times that.
START_LIMIT = 60.0


class EtcdServer:
    def __init__(self, base: Path, address: str = "127.0.0.1", *, netns: str | None = None, port: int = 23790) -> None:
        for tool in ("etcd", "etcdctl"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is missing (apt-get install etcd-server etcd-client)")
        self.base = base
        self.address = address
        self.netns = netns
        self.port = port
        self.data = base / "etcd-data"
        self.log = base / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: how long the last start took to be healthy (s)
        self.started_in = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def _argv(self, *command: str) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *command] if self.netns else list(command)

    def start(self) -> None:
        """Start (or start again, on the same data) and wait until it answers."""
        assert self.proc is None, "already running"
        peer = f"http://{self.address}:{self.port + 1}"
        argv = self._argv(
            "etcd",
            "--logger=zap",
            "--name=s1",
            f"--data-dir={self.data}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=s1={peer}",
            "--pre-vote=true",
        )
        t = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        while True:
            health = subprocess.run(
                self._argv("etcdctl", f"--endpoints={self.url}", "--command-timeout=1s", "endpoint", "health"),
                capture_output=True,
                check=False,
                env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
            )
            if health.returncode == 0:
                self.started_in = time.monotonic() - t
                return
            if self.proc.poll() is not None or time.monotonic() - t > START_LIMIT:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                raise AssertionError(f"etcd did not start ({self.url}): {tail}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (``SIGKILL`` for a crash); a member slow to leave is killed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
