"""Helpers for the tar/rsync exporter tests: policies, an rsync daemon and an SSH
server (the tree with every kind of file is :func:`snapcore.testing.trees.make_every_kind`)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snapcore.testing import DEFAULT_FREEZE_TIMEOUT, machine_pace
from snapcore.testing.trees import MiB as MiB
from snapcore.testing.trees import make_every_kind as make_every_kind  # where it was first


def exporter_policy(
    tmp: Path, mount: Path, exporter: str, options: dict[str, Any], imager: str = "fsfreeze", name: str = "policy"
) -> Path:
    lines = ["version: 1", "mounts:", f"  {mount}:", f"    imager: {imager}", f"    exporter: {exporter}"]
    # an export of a frozen filesystem runs inside the freeze window: the default, scaled
    lines.append(f"    freeze_timeout: {round(machine_pace().seconds(DEFAULT_FREEZE_TIMEOUT) * 1000)}ms")
    lines += ["    options:", f"      {exporter}:"]
    for key, value in options.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = str(value)
        else:
            text = '"' + str(value) + '"'
        lines.append(f"        {key}: {text}")
    path = tmp / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def rsync_daemon(module_path: Path, workdir: Path, module: str = "backup") -> Iterator[str]:
    """An rsync daemon on 127.0.0.1 serving ``module_path``; yields ``rsync://127.0.0.1:PORT/MODULE``."""
    port = free_port()
    conf = workdir / "rsyncd.conf"
    conf.write_text(
        "\n".join(
            [
                f"pid file = {workdir / 'rsyncd.pid'}",
                "use chroot = yes",
                "numeric ids = yes",
                "uid = 0",
                "gid = 0",
                f"[{module}]",
                f"    path = {module_path}",
                "    read only = false",
                "    list = yes",
                "",
            ]
        )
    )
    proc = subprocess.Popen(
        [
            "rsync",
            "--daemon",
            "--no-detach",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--config={conf}",
            f"--log-file={workdir / 'rsyncd.log'}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + machine_pace().seconds(10)
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rsync daemon did not start: {(workdir / 'rsyncd.log').read_text()}")
            time.sleep(0.02)
        yield f"rsync://127.0.0.1:{port}/{module}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """End a test server: SIGTERM, then SIGKILL if it is still there after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def ssh_server(workdir: Path) -> Iterator[str]:
    """A real SSH server on 127.0.0.1 (``sshd.py``, asyncssh) that accepts one new key;
    yields the ``ssh ...`` command line (rsync's ``-e``) that reaches it with that key."""
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / name)], check=True)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("sshd.py")), str(workdir / "host"), str(workdir / "client.pub")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the test SSH server did not start (exit {proc.wait(10)})")
        yield (
            f"ssh -p {port} -i {workdir / 'client'} -o BatchMode=yes -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
        )
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
