"""A checkpoint across three nodes, coordinated on a real etcd (issue 19).

Three nodes on one machine (:mod:`snapcore.testing.nodes`: network, mount and PID
namespaces, each its own ext4 at /srv/app, joined by a bridge in a hub namespace),
an etcd server in the hub (:mod:`snapcore.testing.etcd`), a ``snapcore agent`` on
each node and the coordinator (``snapcore checkpoint --cluster FILE``) on node A,
all started as a user starts them. Each node runs a counter on its /srv/app and
checkpoints it (``pid``) with fsfreeze + tar.

After every failure: nothing is left frozen anywhere (each node's counter goes on and
its /srv/app takes a write within a timeout), the cluster manifest and each node's
own say what failed, and the exit code is 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snapcore.cli.docs import manpage
from snapcore.testing import Pace
from snapcore.testing.containers import BUSYBOX, busybox_rootfs, read_count, runc_bundle, wait_for_count
from snapcore.testing.etcd import EtcdServer
from snapcore.testing.nodes import APP, Node, NodeProcess, Nodes
from snapcore.testing.units import exec_start

pytestmark = pytest.mark.usefixtures("root_only")

SNAPCORE = (sys.executable, "-m", "snapcore", "--state-dir", "/srv/state", "--run-dir", "/srv/run")

POLICY = f"""version: 1
mounts:
  {APP}:
    imager: fsfreeze
    exporter: tar
    freeze_timeout: 30s
    options:
      tar: {{dest: /srv/exports}}
"""

# One process that never forks: a shell's loop vforks `sleep`, and a freeze that caught
# it between the vfork and the child's exec left the shell in its vfork wait (state D,
# yet counted frozen), which CRIU cannot seize ("Unseizable non-zombie ... state D":
# failed proof r, 1 in 8 runs of the CRIU test with a CPU kept busy)
COUNTER = (
    f"exec </dev/null >/dev/null 2>&1; cd {APP}; exec {sys.executable} -I -c "
    '"import itertools, pathlib, time; '
    '[(pathlib.Path(\\"count\\").write_text(str(i)), time.sleep(0.05)) for i in itertools.count(1)]"'
)


@dataclass
class Cluster:
    nodes: Nodes
    etcd: EtcdServer
    pace: Pace
    agents: dict[str, NodeProcess] = field(default_factory=dict)
    counters: dict[str, NodeProcess] = field(default_factory=dict)
    coordinators: list[NodeProcess] = field(default_factory=list)

    @property
    def lease(self) -> float:
        """The agents' and the coordinator's lease (whole seconds, as etcd counts): a
        dead or cut-off agent aborts the others this long after; 1 s, longer on a
        slow or loaded machine (a keep-alive must get through within it)."""
        return float(max(1, round(self.pace.factor)))

    @property
    def all(self) -> list[Node]:
        return self.nodes.nodes

    def start_agent(self, node: Node, *env: str) -> NodeProcess:
        argv = ["env", "SNAPCORE_PLUGINS=fsfreeze,tar", *env, *SNAPCORE, "-v", "agent", "--etcd", self.etcd.url]
        argv += ["--node", node.name, "--lease", f"{self.lease:g}s", "--policy", "/srv/policy.yaml"]
        proc = node.start("sh", "-c", 'exec "$@" 2>>/srv/agent.log', "agent", *argv)
        self.agents[node.name] = proc
        return proc

    def wait_registered(self, names: list[str]) -> None:
        """Until the agents started last on these nodes are registered (not a dead
        one's registration, left until its lease expires)."""
        deadline = time.monotonic() + self.pace.seconds(30)
        pids = {n: self.agents[n].node_pid for n in names}
        while True:
            lines = self.etcdctl("get", "--prefix", "/snapcore/agents/").splitlines()
            registered = {
                k.rpartition("/")[2]: json.loads(v)["pid"] for k, v in zip(lines[::2], lines[1::2], strict=True)
            }
            if all(registered.get(n) == pid for n, pid in pids.items()):
                return
            for name, proc in self.agents.items():
                assert proc.poll() is None, f"the agent of {name} exited: {self.log(name)}"
            assert time.monotonic() < deadline, f"agents not registered: {registered}, not {pids}"
            time.sleep(0.05)

    def etcdctl(self, *args: str) -> str:
        assert self.nodes.hub is not None
        argv = ["nsenter", f"--net=/run/netns/{self.nodes.hub}", "--", "etcdctl", f"--endpoints={self.etcd.url}"]
        done = subprocess.run(
            [*argv, *args], capture_output=True, text=True, env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
        )
        return done.stdout

    def log(self, name: str) -> str:
        node = self.all[ord(name) - ord("A")]
        return node.run("cat", "/srv/agent.log", check=False).stdout[-3000:]

    def request(self, nodes: dict[str, dict[str, Any]], *, deadline: str = "20s") -> None:
        """The request file, on node A (where the coordinator runs)."""
        text = f"etcd: {self.etcd.url}\nlease: {self.lease:g}s\ndeadline: {deadline}\nnodes:\n"
        for name, spec in nodes.items():
            text += f"  {name}: {json.dumps(spec)}\n"
        self.all[0].run("sh", "-c", f"cat > /srv/cluster.yaml <<'EOF'\n{text}EOF")

    def coordinate(self, checkpoint_id: str) -> NodeProcess:
        argv = [*SNAPCORE, "checkpoint", "--cluster", "/srv/cluster.yaml", "--id", checkpoint_id, "--json"]
        proc = self.all[0].start("sh", "-c", 'exec "$@" >/srv/coordinator.out 2>/srv/coordinator.err', "c", *argv)
        self.coordinators.append(proc)  # ended with the test, whatever happened
        return proc

    def result(self, proc: NodeProcess) -> tuple[int, dict[str, Any], str]:
        code = proc.wait(timeout=self.pace.seconds(120))
        a = self.all[0]
        out, err = a.run("cat", "/srv/coordinator.out").stdout, a.run("cat", "/srv/coordinator.err").stdout
        try:
            manifest = json.loads(out)
        except ValueError:
            raise AssertionError(f"exit {code}; stdout {out!r}; stderr {err}; agent A: {self.log('A')}") from None
        return code, manifest, err

    def result_code(self, proc: NodeProcess) -> tuple[int, str, str]:
        """The coordinator's exit code, stdout and stderr (no manifest expected)."""
        code = proc.wait(timeout=self.pace.seconds(120))
        a = self.all[0]
        return code, a.run("cat", "/srv/coordinator.out").stdout, a.run("cat", "/srv/coordinator.err").stdout

    def node_manifest(self, node: Node, checkpoint_id: str) -> dict[str, Any]:
        text = node.run("cat", f"/srv/state/checkpoints/{checkpoint_id}/manifest.json").stdout
        return json.loads(text)  # type: ignore[no-any-return]

    def all_thawed(self) -> None:
        """Every node: its counter goes on, its /srv/app takes a write in time."""
        for node in self.all:
            before = _count(node)
            deadline = time.monotonic() + self.pace.seconds(20)
            while _count(node) <= before:
                assert time.monotonic() < deadline, f"the counter on {node.name} is stopped"
                time.sleep(0.05)
            probe = node.run("timeout", "10", "sh", "-c", f"echo probe > {APP}/probe && sync", check=False)
            assert probe.returncode == 0, f"{APP} on {node.name} does not take a write: {probe.returncode}"


def _cgroup2() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    pytest.skip("no cgroup2 hierarchy")


def _count(node: Node) -> int:
    return int(node.run("cat", f"{APP}/count").stdout.strip() or 0)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nodes, EtcdServer]]:
    nodes = Nodes(tmp_path_factory.mktemp("cluster"), size_mb=64, count=3)
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd"), nodes.hub_address, netns=nodes.hub)
    try:
        etcd.start()
        for node in nodes.nodes:
            setup = f"mkdir -p /srv/state /srv/run /srv/exports && cat > /srv/policy.yaml <<'EOF'\n{POLICY}EOF"
            node.run("sh", "-c", setup)
        yield nodes, etcd
    finally:
        etcd.close()
        problems = nodes.close()
        assert not problems, problems


@pytest.fixture
def cluster(bed: tuple[Nodes, EtcdServer], pace: Pace) -> Iterator[Cluster]:
    nodes, etcd = bed
    if etcd.proc is None:  # a test stopped it
        etcd.start()
    c = Cluster(nodes, etcd, pace)
    # each node's program in a cgroup of its own, as on machines of their own: the
    # checkpoint's temporary cgroup (named by the one id) is made beside it
    groups = [_cgroup2() / f"cluster-{nodes.tag}-{node.name}" for node in nodes.nodes]
    try:
        for node, group in zip(nodes.nodes, groups, strict=True):
            group.mkdir(exist_ok=True)
            join = f"echo $$ > {group}/cgroup.procs && exec sh -c '{COUNTER}'"
            c.counters[node.name] = node.start("sh", "-c", join)
        for node in nodes.nodes:
            c.start_agent(node)
        c.wait_registered([n.name for n in nodes.nodes])
        yield c
    finally:
        for node in nodes.nodes:
            nodes.cut(node, up=True)
        for proc in [*c.coordinators, *c.agents.values(), *c.counters.values()]:
            proc.send_signal(signal.SIGTERM)
        for proc in [*c.coordinators, *c.agents.values(), *c.counters.values()]:
            try:
                proc.wait(timeout=pace.seconds(20))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for group in groups:
            for _ in range(100):  # empty once its processes are reaped
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)


def _tasks(cluster: Cluster, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each node checkpoints its counter; ``extra`` adds to a node's part."""
    return {n.name: {"pid": cluster.counters[n.name].node_pid, **extra.get(n.name, {})} for n in cluster.all}


def test_three_nodes_checkpoint_in_one_window(cluster: Cluster) -> None:
    """Each node's payload runs only once every node is frozen and imaged; one id,
    every node's manifest, the cluster manifest with the skew."""
    payload = ["sh", "-c", "date +%s.%N > /srv/payload-ran"]
    cluster.request(_tasks(cluster, **{n.name: {"payload": payload} for n in cluster.all}))
    code, manifest, err = cluster.result(cluster.coordinate("c1"))
    assert code == 0, (manifest["error"], err, [cluster.log(n.name) for n in cluster.all])
    assert manifest["outcome"] == "ok" and manifest["id"] == "c1"
    assert sorted(manifest["nodes"]) == ["A", "B", "C"]
    assert all(r["state"] == "done" and r["outcome"] == "ok" for r in manifest["nodes"].values()), manifest
    assert set(manifest["barrier_ms"]) == {"ready", "imaged", "dumped"}
    assert isinstance(manifest["skew_ms"], float) and manifest["skew_ms"] >= 0
    frozen = []
    for node in cluster.all:
        own = cluster.node_manifest(node, "c1")
        assert own["outcome"] == "ok" and own["cluster"]["node"] == node.name
        assert own["cluster"]["state"] == "committed", own["cluster"]  # the coordinator's word
        assert own["tasks"] is not None and own["targets"][0]["mount"] == APP
        frozen.append(own["cluster"]["frozen_at"])
    last_frozen = max(frozen)
    for node in cluster.all:  # the payloads ran with every node frozen
        ran = float(node.run("cat", "/srv/payload-ran").stdout)
        assert ran > last_frozen, (node.name, ran, frozen)
    # the cluster manifest is kept beside A's own, and in etcd
    kept = json.loads(cluster.all[0].run("cat", "/srv/state/checkpoints/c1/cluster.json").stdout)
    assert kept["outcome"] == "ok"
    assert json.loads(cluster.etcdctl("get", "--print-value-only", "/snapcore/checkpoints/c1/result"))["id"] == "c1"
    cluster.all_thawed()


def _abandoned(cluster: Cluster, checkpoint_id: str) -> None:
    """No node keeps a part of the checkpoint: its own manifest says it failed, or
    (a part completed before another node failed) it was deleted; no export of it;
    nothing frozen."""
    deadline = time.monotonic() + cluster.pace.seconds(20)  # a complete part goes once the word is known
    for node in cluster.all:
        path = f"/srv/state/checkpoints/{checkpoint_id}/manifest.json"
        while (read := node.run("cat", path, check=False)).returncode == 0:  # gone: discarded
            own = json.loads(read.stdout)
            if own["outcome"] == "failed":
                break
            assert time.monotonic() < deadline, (node.name, own)
            time.sleep(0.05)
        assert checkpoint_id not in node.run("ls", "/srv/exports").stdout.split(), node.name
    cluster.all_thawed()


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_node_that_fails_or_dies_while_frozen_fails_the_whole_checkpoint(cluster: Cluster, fault: str) -> None:
    """B's snapshot fails (``raise``), or its agent dies in its freeze window
    (``kill``: SIGKILL, its guard thaws B and its lease expires): every node thaws."""
    b = cluster.all[1]
    cluster.agents["B"].send_signal(signal.SIGTERM)
    cluster.agents["B"].wait(timeout=cluster.pace.seconds(20))
    cluster.start_agent(b, f"SNAPCORE_FAULT=snapshot={fault}")
    cluster.wait_registered(["B"])
    cluster.request(_tasks(cluster))
    code, manifest, err = cluster.result(cluster.coordinate(f"fail-{fault}"))
    assert code == 1, (manifest, err)
    assert manifest["outcome"] == "failed"
    if fault == "raise":
        assert "node B failed" in manifest["error"] and "snapshot" in manifest["nodes"]["B"]["error"], manifest
    else:  # B's guard thawed B and said so at once: not only when B's lease expired
        assert "node B failed: node B: its agent died; its guard thawed it" in manifest["error"], manifest
        assert cluster.agents["B"].wait(timeout=cluster.pace.seconds(20)) != 0
    for name in ("A", "C"):  # each gave up on B's report (seen itself, or the coordinator's abort)
        assert manifest["nodes"][name]["state"] == "failed", manifest
        assert "node B failed" in manifest["nodes"][name]["error"], manifest
    if fault == "kill":  # B has no manifest of it: its guard thawed it, 'recover' would write one
        cluster.all[1].run("sh", "-c", f"{' '.join(SNAPCORE)} recover")
    _abandoned(cluster, f"fail-{fault}")


GATE = "touch /srv/in-payload; while [ ! -e /srv/go ]; do sleep 0.02; done"


def _states(cluster: Cluster, checkpoint_id: str) -> dict[str, str]:
    prefix = f"/snapcore/checkpoints/{checkpoint_id}/nodes/"
    lines = cluster.etcdctl("get", "--prefix", prefix).splitlines()
    return {k.rpartition("/")[2]: json.loads(v)["state"] for k, v in zip(lines[::2], lines[1::2], strict=True)}


@pytest.mark.parametrize("failure", ["coordinator-killed", "node-cut-off", "etcd-stopped"])
def test_everything_frozen_and_the_word_never_comes(cluster: Cluster, failure: str) -> None:
    """Every node frozen (A in its payload, B and C done with theirs and waiting), then
    the coordinator is SIGKILLed, B is cut off from etcd, or etcd itself is killed:
    every node thaws by itself (its deadline is 20 s: it is not what ends the wait)."""
    a, b = cluster.all[0], cluster.all[1]
    a.run("rm", "-f", "/srv/go", "/srv/in-payload")
    checkpoint_id = f"word-{failure}"
    cluster.request(_tasks(cluster, A={"payload": ["sh", "-c", GATE]}))
    coordinator = cluster.coordinate(checkpoint_id)
    deadline = time.monotonic() + cluster.pace.seconds(30)
    # A past the imaged point (it reports 'dumped' only after its payload) and in its payload
    while _states(cluster, checkpoint_id) != {"A": "imaged", "B": "dumped", "C": "dumped"} or (
        a.run("test", "-e", "/srv/in-payload", check=False).returncode != 0
    ):
        assert time.monotonic() < deadline, _states(cluster, checkpoint_id)
        assert coordinator.poll() is None, cluster.result(coordinator)
        time.sleep(0.02)
    t = time.monotonic()
    if failure == "coordinator-killed":
        coordinator.send_signal(signal.SIGKILL)
    elif failure == "node-cut-off":
        cluster.nodes.cut(b)
    else:
        cluster.etcd.stop(signal.SIGKILL)
    a.run("touch", "/srv/go")
    cluster.all_thawed()
    took = time.monotonic() - t
    assert took < 15, f"the nodes thawed {took:.1f}s after the failure: their deadline did it, not the failure"
    if failure == "coordinator-killed":
        coordinator.wait(timeout=cluster.pace.seconds(20))
    else:
        code, manifest, _ = cluster.result(coordinator)
        assert code == 1 and manifest["outcome"] == "failed", manifest
        reason = "node B was lost" if failure == "node-cut-off" else "etcd"
        assert reason in manifest["error"], manifest
    _abandoned(cluster, checkpoint_id)
    deadline = time.monotonic() + cluster.pace.seconds(10)
    for name in cluster.agents:  # each says so in its log: it gave up, or it discarded its completed part
        if failure != "node-cut-off" or name == "B":
            while not any(f"{checkpoint_id}{w}" in (said := cluster.log(name)) for w in (" failed on", ": discarding")):
                assert time.monotonic() < deadline, (name, said)
                time.sleep(0.05)


def test_show_and_list_know_a_cluster_checkpoint(cluster: Cluster) -> None:
    cluster.request(_tasks(cluster))
    code, manifest, err = cluster.result(cluster.coordinate("shown"))
    assert code == 0, (manifest, err)
    a = cluster.all[0]
    listed = json.loads(a.run(*SNAPCORE, "list", "--json").stdout)
    rows = [r for r in listed if r["id"] == "shown"]
    assert {r.get("kind") for r in rows} == {None, "cluster"}, rows  # A's own part, and the cluster
    [whole] = [r for r in rows if r.get("kind") == "cluster"]
    assert whole["nodes"] == ["A", "B", "C"] and whole["outcome"] == "ok"
    [part] = [r for r in rows if r.get("kind") is None]
    assert part["cluster"]["node"] == "A" and part["cluster"]["state"] == "committed"
    text = a.run(*SNAPCORE, "show", "shown").stdout
    assert "checkpoint shown: ok" in text and "cluster checkpoint shown: ok" in text, text
    assert json.loads(a.run(*SNAPCORE, "show", "shown", "--cluster", "--json").stdout)["id"] == "shown"
    assert json.loads(a.run(*SNAPCORE, "show", "shown", "--json").stdout)["cluster"]["node"] == "A"
    # B holds its own part only
    missing = cluster.all[1].run(*SNAPCORE, "show", "shown", "--cluster", check=False)
    assert missing.returncode == 2 and "no cluster manifest here" in missing.stderr


def test_a_node_without_an_agent_is_refused_before_anything_is_asked(cluster: Cluster) -> None:
    cluster.request({"A": {}, "D": {}})
    code, _, err = cluster.result_code(cluster.coordinate("nobody"))
    assert code == 2 and "no agent registered for node D" in err, err
    assert cluster.etcdctl("get", "--prefix", "--keys-only", "/snapcore/checkpoints/nobody/").split() == []


BAD_REQUESTS = [
    ("etcd: http://127.0.0.1:1\nnodes: {A: {}}\nfrobnicate: 1\n", ":3", "frobnicate"),
    ("nodes: {A: {}}\n", ":1", "'etcd'"),
    ("etcd: http://127.0.0.1:1\nnodes:\n  A: {policy: relative.yaml}\n", ":3", "absolute path"),
    ("etcd: http://127.0.0.1:1\nnodes:\n  A: {pid: true}\n", ":3", "'pid'"),
    ("etcd: http://127.0.0.1:1\nnodes:\n  A: {pid: 1, cgroup: /x}\n", ":3", "give one of 'pid', 'cgroup'"),
    ("etcd: http://127.0.0.1:1\nnodes:\n  A: {container: lxc:web}\n", ":3", "key 'container'"),
    ("etcd: http://127.0.0.1:1\nnodes:\n  'a b': {}\n", ":3", "node name"),
    ("etcd: http://127.0.0.1:1\ndeadline: soon\nnodes: {A: {}}\n", ":2", "'deadline'"),
    ("etcd: http://127.0.0.1:1\nnodes: {A: {payload: ls}}\n", ":2", "'payload'"),
    ("etcd: ftp://x\nnodes: {A: {}}\n", "", "http://HOST:PORT"),
]


@pytest.mark.parametrize(("text", "line", "says"), BAD_REQUESTS)
def test_a_bad_request_file_is_named_exit_2(tmp_path: Path, text: str, line: str, says: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "snapcore", "--state-dir", str(tmp_path), "checkpoint", "--cluster", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and f"{path}{line}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_cluster_with_what_its_file_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("etcd: http://127.0.0.1:1\nnodes: {A: {}}\n")
    argv = [sys.executable, "-m", "snapcore", "checkpoint", "--cluster", str(path), "--pid", "1", "--", "true"]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 2 and "not with --pid, -- CMD" in done.stderr, done.stderr


UNIT = Path(__file__).resolve().parent.parent / "systemd" / "snapcore-agent.service"


def test_the_agent_s_systemd_unit_runs_an_agent(cluster: Cluster, tmp_path: Path) -> None:
    """systemd is not running here: the unit is checked by ``systemd-analyze verify``
    and its ExecStart, expanded as systemd would from /etc/default/snapcore-agent, is
    run on node C and takes its part in a checkpoint."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (systemd)")
    unit = UNIT.read_text()
    local = tmp_path / "snapcore-agent.service"
    local.write_text(unit.replace("/usr/local/bin/snapcore", str(Path(sys.executable).parent / "snapcore")))
    man = tmp_path / "man" / "man8"  # where its Documentation= points
    man.mkdir(parents=True)
    (man / "snapcore.8").write_text(manpage())
    with_man = {**os.environ, "MANPATH": str(tmp_path / "man")}
    verified = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, env=with_man)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    c = cluster.all[2]
    cluster.agents["C"].send_signal(signal.SIGTERM)
    cluster.agents["C"].wait(timeout=cluster.pace.seconds(20))
    defaults = {"SNAPCORE_ETCD": cluster.etcd.url, "SNAPCORE_NODE": "C"}
    defaults["SNAPCORE_AGENT_ARGS"] = f"--policy /srv/policy.yaml --lease {cluster.lease:g}s"
    argv = exec_start(unit, defaults)
    assert argv[:2] == ["/usr/local/bin/snapcore", "agent"], argv
    argv[0] = str(Path(sys.executable).parent / "snapcore")
    env = ["SNAPCORE_PLUGINS=fsfreeze,tar", "SNAPCORE_STATE_DIR=/srv/state", "SNAPCORE_RUN_DIR=/srv/run"]
    cluster.agents["C"] = c.start("sh", "-c", 'exec "$@" 2>>/srv/agent.log', "unit", "env", *env, *argv)
    cluster.wait_registered(["C"])
    cluster.request(_tasks(cluster))
    code, manifest, err = cluster.result(cluster.coordinate("by-unit"))
    assert code == 0 and manifest["nodes"]["C"]["state"] == "done", (manifest, err)
    assert cluster.node_manifest(c, "by-unit")["cluster"]["state"] == "committed"


def _restore_file(cluster: Cluster, nodes: dict[str, dict[str, Any]]) -> None:
    text = f"etcd: {cluster.etcd.url}\nlease: {cluster.lease:g}s\ndeadline: 20s\nfinish: 60s\nnodes:\n"
    text += "".join(f"  {name}: {json.dumps(spec)}\n" for name, spec in nodes.items())
    cluster.all[0].run("sh", "-c", f"cat > /srv/restore.yaml <<'EOF'\n{text}EOF")


def _restore(cluster: Cluster, checkpoint_id: str) -> subprocess.CompletedProcess[str]:
    argv = [*SNAPCORE, "restore", checkpoint_id, "--cluster", "/srv/restore.yaml"]
    return cluster.all[0].run(*argv, check=False, timeout=cluster.pace.seconds(120))


def test_a_cluster_checkpoint_with_criu_restarts_on_every_node(cluster: Cluster, criu: Any) -> None:
    """Each node's counter dumped by CRIU while every node is frozen (the payload),
    the nodes' trees wiped, then ``restore ID --cluster``: every node's files back
    (and checked), and only then, on every node, ``criu restore``: each counter goes
    on from its checkpoint."""
    pids = {n.name: cluster.counters[n.name].node_pid for n in cluster.all}
    dump = {n: [criu.path, "dump", "-t", str(p), "-D", "/srv/images", "-o", "dump.log"] for n, p in pids.items()}
    for node in cluster.all:
        node.run("sh", "-c", "rm -rf /srv/images && mkdir /srv/images")
    cluster.request(_tasks(cluster, **{n: {"payload": argv} for n, argv in dump.items()}))
    code, manifest, err = cluster.result(cluster.coordinate("cr"))
    assert code == 0, (manifest["error"], err)
    try:
        at_checkpoint = {}
        for node in cluster.all:
            cluster.counters[node.name].wait(timeout=cluster.pace.seconds(20))  # CRIU ended it
            at_checkpoint[node.name] = _count(node)
            node.run("sh", "-c", f"rm -rf {APP}/* {APP}/.[!.]*")  # lost: only the checkpoint has it
        restore = [criu.path, "restore", "-D", "/srv/images", "-d", "-o", "restore.log", "--manage-cgroups=ignore"]
        _restore_file(cluster, {n.name: {"to": APP, "payload": restore} for n in cluster.all})
        done = _restore(cluster, "cr")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "cluster restore cr: ok" in done.stdout, done.stdout
        for node in cluster.all:  # each counter goes on from where it was
            deadline = time.monotonic() + cluster.pace.seconds(20)
            while _count(node) <= at_checkpoint[node.name] + 2:
                assert time.monotonic() < deadline, f"the counter did not go on on {node.name}"
                time.sleep(0.05)
            assert _count(node) < at_checkpoint[node.name] + 1000  # from the checkpoint, not from zero
    finally:  # the restored counters have the PIDs they had
        for node in cluster.all:
            node.run("kill", "-9", str(pids[node.name]), check=False)


def test_a_cluster_restore_that_fails_on_one_node_starts_nothing(cluster: Cluster) -> None:
    """B cannot restore (its target directory is not empty): no node runs its command."""
    cluster.request(_tasks(cluster))
    code, manifest, err = cluster.result(cluster.coordinate("r-fail"))
    assert code == 0, (manifest["error"], err)
    for node in cluster.all:
        node.run("sh", "-c", "rm -rf /srv/copy /srv/started && mkdir /srv/copy")
    cluster.all[1].run("touch", "/srv/copy/in-the-way")
    started = ["sh", "-c", "touch /srv/started"]
    _restore_file(cluster, {n.name: {"to": "/srv/copy", "payload": started} for n in cluster.all})
    done = _restore(cluster, "r-fail")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "node B failed" in done.stderr, done.stderr
    for node in cluster.all:
        assert node.run("test", "-e", "/srv/started", check=False).returncode != 0, node.name


def test_a_cluster_checkpoint_id_is_used_once(cluster: Cluster) -> None:
    """The same id again is refused before anything is asked (exit 2): the first's
    cluster manifest and the nodes' parts stay as they were."""
    cluster.request(_tasks(cluster))
    code, manifest, err = cluster.result(cluster.coordinate("once"))
    assert code == 0, (manifest, err)
    code, _, err = cluster.result_code(cluster.coordinate("once"))
    assert code == 2 and "already exists" in err, err
    kept = json.loads(cluster.all[0].run("cat", "/srv/state/checkpoints/once/cluster.json").stdout)
    assert kept["outcome"] == "ok"
    for node in cluster.all:
        assert cluster.node_manifest(node, "once")["outcome"] == "ok"


def test_runc_containers_on_three_nodes_checkpoint_in_one_window(cluster: Cluster, criu: Any, tmp_path: Path) -> None:
    """``container: runc:ID`` on each node: the container's cgroup frozen at the
    cluster's freeze, ``runc checkpoint`` the payload while every node is frozen (its
    CRIU dumps the frozen cgroup); the containers end; ``runc restore`` brings each
    back, counting on."""
    if shutil.which("runc") is None or not os.path.exists(BUSYBOX):
        pytest.skip("runc and busybox-static are needed (make setup installs them)")
    ids = {n.name: f"cl{os.getpid()}{n.name.lower()}" for n in cluster.all}
    runc = ["runc", "--root", "/srv/runc", "--criu", criu.path]
    # stdio its own: runc's would be the test's pipes, and CRIU dumps no pipe of another's
    program = "exec </dev/null >/dev/null 2>&1; i=0; while :; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"
    counts = {}
    try:
        for node in cluster.all:
            busybox_rootfs(f"/proc/{node.init}/root{APP}/rootfs")
            runc_bundle(tmp_path / f"bundle-{node.name}", f"{APP}/rootfs", program)
            node.run("rm", "-rf", "/srv/img", "/srv/work")
            node.run(*runc, "run", "-d", "--bundle", str(tmp_path / f"bundle-{node.name}"), ids[node.name])
            counts[node.name] = Path(f"/proc/{node.init}/root{APP}/rootfs/data/count")
            wait_for_count(counts[node.name], 2, cluster.pace.seconds(30))
        dump = {
            n: [*runc, "checkpoint", "--image-path", "/srv/img", "--work-path", "/srv/work", i] for n, i in ids.items()
        }
        cluster.request({n: {"container": f"runc:{ids[n]}", "payload": argv} for n, argv in dump.items()})
        code, manifest, err = cluster.result(cluster.coordinate("containers"))
        assert code == 0, (manifest["error"], err)
        at_checkpoint = {}
        for node in cluster.all:
            own = cluster.node_manifest(node, "containers")
            assert own["tasks"]["container"] == f"runc:{ids[node.name]}" and own["cluster"]["state"] == "committed"
            assert node.run(*runc, "state", ids[node.name], check=False).returncode != 0  # ended by its CRIU
            at_checkpoint[node.name] = read_count(counts[node.name]) or 0
        for node in cluster.all:
            bundle = str(tmp_path / f"bundle-{node.name}")
            restore = ["restore", "-d", "--image-path", "/srv/img", "--work-path", "/srv/work", "--bundle", bundle]
            node.run(*runc, *restore, ids[node.name])
            went_on = wait_for_count(counts[node.name], at_checkpoint[node.name] + 2, cluster.pace.seconds(30))
            assert went_on < at_checkpoint[node.name] + 1000  # from the checkpoint, not from zero
    finally:
        for node in cluster.all:
            node.run(*runc, "delete", "-f", ids[node.name], check=False)


def test_a_cluster_restore_on_another_node_from_an_export(cluster: Cluster) -> None:
    """A and B checkpoint; B's export is copied to C; the restore puts A's part back on
    A and B's on C (``from``), each checked against the checkpoint's inventory."""
    a, b, c = cluster.all
    cluster.request({n.name: {"pid": cluster.counters[n.name].node_pid} for n in (a, b)})
    code, manifest, err = cluster.result(cluster.coordinate("elsewhere"))
    assert code == 0, (manifest["error"], err)
    assert sorted(manifest["nodes"]) == ["A", "B"]
    exported = Path(f"/proc/{b.init}/root/srv/exports/elsewhere")
    shutil.copytree(exported, Path(f"/proc/{c.init}/root/srv/imported"), symlinks=True, dirs_exist_ok=False)
    try:
        for node in (a, c):
            node.run("sh", "-c", "rm -rf /srv/copy && mkdir /srv/copy")
        restore = {"A": {"to": "/srv/copy"}, "C": {"from": "/srv/imported", "to": "/srv/copy"}}
        _restore_file(cluster, restore)
        done = _restore(cluster, "elsewhere")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "cluster restore elsewhere: ok" in done.stdout
        # C has B's tree as it was at the checkpoint: its counter's file, as B's export has it
        from_b = int(b.run("tar", "-xOf", "/srv/exports/elsewhere/srv-app.tar", "./count").stdout)
        assert int(c.run("cat", "/srv/copy/count").stdout) == from_b
        assert int(a.run("cat", "/srv/copy/count").stdout) > 0
    finally:
        c.run("rm", "-rf", "/srv/imported")
