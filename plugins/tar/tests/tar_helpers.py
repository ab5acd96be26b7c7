"""Helpers for the tar/rsync exporter tests: a tree with every kind of file, a
bit-for-bit description of a tree to compare, policies, an rsync daemon and an SSH
server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snapcore.testing import DEFAULT_FREEZE_TIMEOUT, machine_pace

MiB = 1 << 20


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


def make_every_kind(root: Path) -> None:
    """Every kind of file a backup must keep, with owners, modes, times, xattrs, ACLs."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text("hello\n")
    (root / "dir" / "random.bin").write_bytes(os.urandom(MiB + 12345))
    (root / "dir" / "sub" / "deep.txt").write_text("deep\n" * 1000)
    # odd names: a newline, non-UTF-8 bytes, an arrow, quotes, spaces
    (root / "dir" / "new\nline").write_text("nl")
    (root / os.fsdecode(b"latin1-\xe9t\xe9")).write_text("bytes")
    (root / "arrow -> not a link").write_text("arrow")
    (root / 'quote"s and spaces').write_text("q")
    # hard links
    (root / "hard-a").write_text("linked\n")
    os.link(root / "hard-a", root / "dir" / "hard-b")
    # symlinks: relative, absolute (dangling here), to a directory
    os.symlink("small.txt", root / "link-rel")
    os.symlink("/nonexistent/absolute", root / "link-abs")
    os.symlink("dir/sub", root / "link-dir")
    # device nodes and a fifo
    os.mknod(root / "char-dev", 0o620 | 0o020000, os.makedev(1, 3))
    os.mknod(root / "block-dev", 0o660 | 0o060000, os.makedev(7, 200))
    os.mkfifo(root / "fifo", 0o640)
    # a sparse file: 32 MiB with two small extents of data
    with open(root / "sparse", "wb") as f:
        f.seek(8 * MiB)
        f.write(b"middle" * 1000)
        f.truncate(32 * MiB)
        f.seek(32 * MiB - 4)
        f.write(b"end!")
    # modes and owners
    os.chmod(root / "small.txt", 0o4751)
    os.chmod(root / "dir" / "sub", 0o1777)
    os.chown(root / "small.txt", 1234, 5678)
    os.lchown(root / "link-rel", 4321, 8765)
    os.chown(root / "dir", 2000, 3000)
    # xattrs (user and trusted namespaces) and ACLs (access and default)
    os.setxattr(root / "small.txt", "user.color", b"blue")
    os.setxattr(root / "dir" / "random.bin", "trusted.snapcore", b"\x00\x01binary\xff")
    subprocess.run(["setfacl", "-m", "u:1234:rw,g:5678:r", str(root / "empty")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:1234:rwx", str(root / "dir")], check=True)
    # times, to the nanosecond
    for i, rel in enumerate(["empty", "small.txt", "dir/random.bin", "sparse", "dir/sub/deep.txt", "dir"]):
        os.utime(root / rel, ns=(1_600_000_000_123_456_789 + i, 1_500_000_000_987_654_321 + i * 1000))
    os.utime(root / "link-rel", ns=(1_400_000_000_000_000_001, 1_400_000_000_000_000_002), follow_symlinks=False)


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
