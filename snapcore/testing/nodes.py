"""Nodes on one machine, for tests that move a checkpoint from one to another.

A node is a network namespace, a private mount namespace and a PID namespace of its
own (with its own ``/proc``), whose init is a small reaper (:data:`REAPER`), with an
ext4 loop filesystem of its own at ``/srv/app`` (a tmpfs on ``/srv`` keeps it off the
host): the same path on every node, a different filesystem behind it. Separate PID
spaces are what separate machines have: ``criu restore`` gives the tasks back their
PIDs on B while the originals may still exist, frozen, on A. Each node's PIDs start
at a different number (A near 10000, B near 20000), so that what runs on B does not
take the PIDs a program from A needs there. Two nodes are joined by a veth pair, with addresses in a
``10.213.N.0/24`` of their own; more (``count``) by a bridge in a hub namespace
(``.254``, where a test runs a server they all reach: etcd); traffic goes only
between those addresses. Commands
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
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Where each node's own filesystem is, on every node.
APP = "/srv/app"

#: PID 1 of a node: reaps every orphan (a task CRIU ended, a daemon's children)
#: at once, so that their PIDs are free again for a ``criu restore``.
REAPER = """
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD, signal.SIGTERM, signal.SIGINT])
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    signal.sigtimedwait([signal.SIGCHLD], 1.0)
"""


def _in_netns(netns: str, *command: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *command]


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, timeout=60, **kw)


def _first_child(pid: int) -> int | None:
    """The first child of ``pid`` (None: none yet, or ``pid`` is gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    return None


class NodeProcess(subprocess.Popen[bytes]):
    """A process started on a node: ``nsenter`` forks to enter the PID namespace, so
    the process itself is nsenter's child; signals go to it, and :attr:`node_pid` is
    its PID as the node sees it (what ``--pid`` and ``criu dump -t`` take there)."""

    def inner(self) -> int | None:
        """The process's PID on the host, once nsenter has forked it (None: gone)."""
        deadline = time.monotonic() + 10
        while True:
            child = _first_child(self.pid)
            if child is not None:
                return child
            if self.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.005)

    @property
    def node_pid(self) -> int:
        inner = self.inner()
        assert inner is not None, "the process on the node is gone"
        for line in Path(f"/proc/{inner}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise AssertionError(f"no NSpid for {inner}")

    def send_signal(self, sig: int) -> None:
        inner = self.inner() if self.returncode is None else None
        if inner is None:
            super().send_signal(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(inner, sig)


@dataclass
class Node:
    name: str
    netns: str
    address: str
    #: ``unshare``, waiting for the node's init (:data:`REAPER`); killing it ends the node
    holder: subprocess.Popen[bytes]
    loop: str
    #: the node's init (PID 1 inside), as the host sees it
    init: int = 0

    def argv(self, *command: str) -> list[str]:
        """``command`` run in this node's mount, network and PID namespaces."""
        return ["nsenter", "-t", str(self.init), "-m", "-n", "-p", "--", *command]

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

    def start(self, *command: str, **kw: Any) -> NodeProcess:
        """A long-running ``command`` on this node, in a session of its own, stdio to /dev/null."""
        return NodeProcess(
            self.argv("setsid", *command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            **kw,
        )


class Nodes:
    """Nodes A, B (, C, ...); two are joined by a veth pair, more by a bridge in a hub
    namespace of their own (:attr:`hub`, address ``.254``: where a test runs a
    server every node reaches); ``close`` undoes everything."""

    def __init__(self, base: Path, size_mb: int = 256, count: int = 2) -> None:
        for tool in ("ip", "nsenter", "unshare", "losetup", "mkfs.ext4"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is missing (iproute2, util-linux, e2fsprogs)")
        self.base = base
        self.tag = tag = f"{os.getpid() % 100000}"
        self.subnet = f"10.213.{os.getpid() % 250 + 1}"
        self.nodes: list[Node] = []
        #: the namespace of the bridge, with more than two nodes (None: a veth pair)
        self.hub: str | None = None
        self._netns: list[str] = []
        self._loops: list[str] = []
        names = [chr(ord("A") + i) for i in range(count)]
        try:
            for name in names:
                netns = f"snapcore-{tag}-{name}"
                _run(["ip", "netns", "add", netns])
                self._netns.append(netns)
            if count == 2:
                devs = [f"sv{tag}a", f"sv{tag}b"]
                _run(["ip", "link", "add", devs[0], "type", "veth", "peer", "name", devs[1]])
            else:
                devs = self._hub(count)
            for i, name in enumerate(names):
                self._node(i, name, devs[i], size_mb)
        except BaseException:
            self.close()
            raise

    def _hub(self, count: int) -> list[str]:
        """A bridge in a namespace of its own, a veth from each node to it; the
        nodes' ends (the hub's are ``...h<i>``)."""
        hub = self.hub = f"snapcore-{self.tag}-hub"
        _run(["ip", "netns", "add", hub])
        self._netns.append(hub)
        _run(["ip", "-n", hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", hub, "addr", "add", f"{self.subnet}.254/24", "dev", "br0"])
        for dev in ("br0", "lo"):
            _run(["ip", "-n", hub, "link", "set", dev, "up"])
        devs = []
        for i in range(count):
            dev, peer = f"sv{self.tag}n{i}", f"sv{self.tag}h{i}"
            _run(["ip", "link", "add", dev, "type", "veth", "peer", "name", peer])
            _run(["ip", "link", "set", peer, "netns", hub])
            _run(["ip", "-n", hub, "link", "set", peer, "master", "br0"])
            _run(["ip", "-n", hub, "link", "set", peer, "up"])
            devs.append(dev)
        return devs

    @property
    def hub_address(self) -> str:
        return f"{self.subnet}.254"

    def cut(self, node: Node, *, up: bool = False) -> None:
        """Cut ``node`` off the hub (its link goes down), or (``up``) join it again."""
        assert self.hub is not None, "only nodes on a hub can be cut off"
        i = self.nodes.index(node)
        _run(["ip", "-n", self.hub, "link", "set", f"sv{self.tag}h{i}", "up" if up else "down"])

    def _node(self, i: int, name: str, dev: str, size_mb: int) -> None:
        netns, address = self._netns[i], f"{self.subnet}.{i + 1}"
        _run(["ip", "link", "set", dev, "netns", netns])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", dev])
        _run(["ip", "-n", netns, "link", "set", dev, "up"])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])
        loop = self._loop(f"node-{name}.img", size_mb)
        unshare = ("unshare", "--mount", "--propagation", "private", "--pid", "--kill-child", "--mount-proc")
        holder = subprocess.Popen(
            # not 'ip netns exec': it mounts a sysfs of its own over /sys, and the
            # node would lose the cgroup hierarchies a --pid checkpoint freezes with
            [*unshare, "--", *_in_netns(netns, sys.executable, "-c", REAPER)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        node = Node(name=name, netns=netns, address=address, holder=holder, loop=loop)
        self.nodes.append(node)
        self._wait_in_own_namespace(node)
        node.run("sh", "-c", f"echo {10000 * (i + 1)} > /proc/sys/kernel/ns_last_pid")
        node.run("sh", "-c", f"mount -t tmpfs snapcore-node-{name} /srv && mkdir {APP} && mount {loop} {APP}")
        node.run("rmdir", f"{APP}/lost+found")  # empty: a restore --to goes there

    @staticmethod
    def _wait_in_own_namespace(node: Node) -> None:
        """The holder's child, the node's init, runs the reaper in its own namespaces."""
        deadline = time.monotonic() + 30
        mine = os.readlink("/proc/self/ns/pid")
        while True:
            init = _first_child(node.holder.pid)
            with contextlib.suppress(OSError):
                if init is not None and (
                    Path(f"/proc/{init}/cmdline").read_bytes().startswith(sys.executable.encode() + b"\0")
                    and os.readlink(f"/proc/{init}/ns/pid") != mine
                ):
                    node.init = init
                    return
            if node.holder.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"node {node.name}: its namespace holder did not start")
            time.sleep(0.01)

    def _loop(self, name: str, size_mb: int) -> str:
        """A new ext4 image file under the base directory, on a loop device (undone by close)."""
        image = self.base / name
        with open(image, "wb") as f:
            f.truncate(size_mb << 20)
        _run(["mkfs.ext4", "-q", "-F", str(image)])
        loop = _run(["losetup", "-f", "--show", str(image)]).stdout.strip()
        self._loops.append(loop)
        return loop

    def add_fs(self, node: Node, where: str, size_mb: int) -> str:
        """Another ext4 on ``node`` at ``where`` (under ``/srv``), gone with the nodes."""
        loop = self._loop(f"node-{node.name}-{len(self._loops)}.img", size_mb)
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
        self.hub = None
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


def rsync_daemon(node: Node, modules: dict[str, Path], base: Path, port: int = 8730) -> NodeProcess:
    """An rsync daemon on ``node``'s address, ``modules`` name → directory, writable."""
    conf = base / f"rsyncd-{node.name}.conf"
    conf.write_text(
        "uid = root\ngid = root\nuse chroot = no\n"
        + "".join(f"[{name}]\npath = {path}\nread only = no\n" for name, path in modules.items())
    )
    daemon = NodeProcess(
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
