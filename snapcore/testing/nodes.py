"""Nodes on one machine, for tests that move a checkpoint from one to another.

A node is a network namespace and a private mount namespace, held by a ``sleep
infinity`` process, with an ext4 loop filesystem of its own at ``/srv/app`` (a tmpfs
on ``/srv`` keeps it off the host): the same path on every node, a different
filesystem behind it. Two nodes are joined by a veth pair, with addresses in a
``10.213.N.0/24`` of their own; traffic goes only between those addresses. Commands
run on a node through ``nsenter`` (:meth:`Node.run`). Everything is torn down by
:meth:`Nodes.close`, also when the test failed: the processes in the namespaces, the
holders (their mounts go with them), the loop devices, the namespaces. The recipe is
``shared/notes/nodes.md``'s.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Where each node's own filesystem is, on every node.
APP = "/srv/app"


def _in_netns(netns: str, *command: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *command]


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, timeout=60, **kw)


@dataclass
class Node:
    name: str
    netns: str
    address: str
    holder: subprocess.Popen[bytes]
    loop: str

    def argv(self, *command: str) -> list[str]:
        """``command`` run in this node's mount and network namespaces."""
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *command]

    def run(
        self, *command: str, check: bool = True, timeout: float = 120, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(*command),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kw,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(command)}: exit {done.returncode}: {done.stderr[-3000:]}")
        return done

    def start(self, *command: str, **kw: Any) -> subprocess.Popen[bytes]:
        """A long-running ``command`` on this node, in a session of its own, stdio to /dev/null."""
        return subprocess.Popen(
            self.argv("setsid", *command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            **kw,
        )


class Nodes:
    """Two nodes, A and B, joined by a veth pair; ``close`` undoes everything."""

    def __init__(self, base: Path, size_mb: int = 256) -> None:
        for tool in ("ip", "nsenter", "unshare", "losetup", "mkfs.ext4"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is missing (iproute2, util-linux, e2fsprogs)")
        self.base = base
        tag = f"{os.getpid() % 100000}"
        self.subnet = f"10.213.{os.getpid() % 250 + 1}"
        self.nodes: list[Node] = []
        self._netns: list[str] = []
        self._loops: list[str] = []
        try:
            veth = (f"sv{tag}a", f"sv{tag}b")
            for name in ("A", "B"):
                netns = f"snapcore-{tag}-{name}"
                _run(["ip", "netns", "add", netns])
                self._netns.append(netns)
            _run(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]])
            for i, name in enumerate(("A", "B")):
                netns, dev, address = self._netns[i], veth[i], f"{self.subnet}.{i + 1}"
                _run(["ip", "link", "set", dev, "netns", netns])
                _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", dev])
                _run(["ip", "-n", netns, "link", "set", dev, "up"])
                _run(["ip", "-n", netns, "link", "set", "lo", "up"])
                image = base / f"node-{name}.img"
                with open(image, "wb") as f:
                    f.truncate(size_mb << 20)
                _run(["mkfs.ext4", "-q", "-F", str(image)])
                loop = _run(["losetup", "-f", "--show", str(image)]).stdout.strip()
                self._loops.append(loop)
                holder = subprocess.Popen(
                    # not 'ip netns exec': it mounts a sysfs of its own over /sys, and the
                    # node would lose the cgroup hierarchies a --pid checkpoint freezes with
                    [*("unshare", "--mount", "--propagation", "private", "--"), *_in_netns(netns, "sleep", "infinity")],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                node = Node(name=name, netns=netns, address=address, holder=holder, loop=loop)
                self.nodes.append(node)
                self._wait_in_own_namespace(node)
                node.run("sh", "-c", f"mount -t tmpfs snapcore-node-{name} /srv && mkdir {APP} && mount {loop} {APP}")
                node.run("rmdir", f"{APP}/lost+found")  # empty: a restore --to goes there
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _wait_in_own_namespace(node: Node) -> None:
        """The holder has exec'd ``sleep`` inside its own mount namespace."""
        deadline = time.monotonic() + 30
        mine = os.readlink("/proc/self/ns/mnt")
        while True:
            with contextlib.suppress(OSError):
                if (
                    Path(f"/proc/{node.holder.pid}/comm").read_text().strip() == "sleep"
                    and os.readlink(f"/proc/{node.holder.pid}/ns/mnt") != mine
                ):
                    return
            if node.holder.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"node {node.name}: its namespace holder did not start")
            time.sleep(0.01)

    def add_fs(self, node: Node, where: str, size_mb: int) -> str:
        """Another ext4 on ``node`` at ``where`` (under ``/srv``), gone with the nodes."""
        image = self.base / f"node-{node.name}-{len(self._loops)}.img"
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        _run(["mkfs.ext4", "-q", "-F", str(image)])
        loop = _run(["losetup", "-f", "--show", str(image)]).stdout.strip()
        self._loops.append(loop)
        node.run("sh", "-c", f"mkdir -p {where} && mount {loop} {where}")
        return loop

    @property
    def a(self) -> Node:
        return self.nodes[0]

    @property
    def b(self) -> Node:
        return self.nodes[1]

    def close(self) -> list[str]:
        """Tear everything down; what could not be, in words."""
        problems: list[str] = []
        for netns in self._netns:
            pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                node.holder.kill()
            node.holder.wait()
        for loop in self._loops:
            for _ in range(50):  # the namespace's mounts go once its last process is reaped
                if subprocess.run(["losetup", "-d", loop], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                problems.append(f"{loop} could not be detached")
        for netns in self._netns:
            if subprocess.run(["ip", "netns", "del", netns], capture_output=True).returncode != 0:
                problems.append(f"netns {netns} could not be deleted")
        self.nodes, self._loops, self._netns = [], [], []
        return problems


@pytest.fixture
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Nodes A and B (:class:`Nodes`), each its own ``/srv/app``, joined by a veth pair."""
    if os.geteuid() != 0:
        pytest.skip("namespaces, veths and loop devices need root")
    nodes = Nodes(tmp_path_factory.mktemp("nodes"))
    try:
        yield nodes
    finally:
        problems = nodes.close()
        assert not problems, problems


def rsync_daemon(node: Node, modules: dict[str, Path], base: Path, port: int = 8730) -> subprocess.Popen[bytes]:
    """An rsync daemon on ``node``'s address, ``modules`` name → directory, writable."""
    conf = base / f"rsyncd-{node.name}.conf"
    conf.write_text(
        "uid = root\ngid = root\nuse chroot = no\n"
        + "".join(f"[{name}]\npath = {path}\nread only = no\n" for name, path in modules.items())
    )
    daemon = subprocess.Popen(
        node.argv(
            "rsync", "--daemon", "--no-detach", f"--config={conf}", f"--address={node.address}", f"--port={port}"
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while node.run("rsync", f"rsync://{node.address}:{port}/", check=False, timeout=10).returncode != 0:
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the rsync daemon on {node.name} did not start")
        time.sleep(0.05)
    return daemon
