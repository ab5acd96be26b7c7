"""Benchmark: a checkpoint of three nodes coordinated on etcd, against the same three
checkpoints run at once without coordination (issue 19).

Run as root: ``.venv/bin/python bench/cluster.py [--rounds 7]``. Three nodes on this
machine (:mod:`snapcore.testing.nodes`: network, mount and PID namespaces, each its
own idle ext4 at /srv/app, a bridge between them), a real etcd in the hub namespace
(:mod:`snapcore.testing.etcd`), and per round, alternating:

* **uncoordinated**: on every node a warm Python process (snapcore imported, its
  plugins loaded: as warm as an agent) told at the same instant to run
  ``snapcore.checkpoint(policy=...)`` (fsfreeze of /srv/app);
* **coordinated**: ``snapcore checkpoint --cluster FILE`` on node A, each node's
  ``snapcore agent`` running the same checkpoint through the meeting points.

Printed: each way's time to every node's manifest (the slowest node's in-process
``timings.total``: no interpreter start on either side) and the difference, the time
added by the barrier (target <= 10 ms on loopback), the coordinator's waits at each
meeting point, and the skew between the nodes' freeze instants (the cluster
manifest's ``skew_ms``, target <= 5 ms median); then, ``--deaths`` times, node B's
agent SIGKILLed inside its freeze window (``SNAPCORE_FAULT=snapshot=kill``): the
time from its death to the last of the other nodes thawed (their manifests' freeze
instant plus freeze window), against the agents' lease (target <= lease + 100 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from floor import header, machine_floor, ratio

from snapcore.testing.etcd import EtcdServer
from snapcore.testing.nodes import Node, Nodes

POLICY = "version: 1\nmounts:\n  /srv/app:\n    imager: fsfreeze\n    freeze_timeout: 30s\n"
SNAPCORE = (sys.executable, "-m", "snapcore", "--state-dir", "/srv/state", "--run-dir", "/srv/run")
LEASE = 1.0

#: A warm process on a node: one checkpoint per line read (its id), its total and
#: freeze instant printed.
WORKER = """
import json, sys
import snapcore
plugins = snapcore.make_plugins()
print("ready", flush=True)
for line in sys.stdin:
    m = snapcore.checkpoint(policy="/srv/policy.yaml", checkpoint_id=line.strip(), state_dir="/srv/state",
                            run_dir="/srv/run", plugins=plugins)
    print(json.dumps({"total": m.timings["total"], "window": m.freeze_window_ms}), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="checkpoints of each kind (medians)")
    parser.add_argument("--deaths", type=int, default=5, help="agents killed in their freeze window")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: it makes namespaces, loop filesystems and freezes them")
    print(header(machine_floor()))
    base = Path(tempfile.mkdtemp(prefix="snapcore-bench-cluster-"))
    nodes = Nodes(base, size_mb=64, count=3)
    etcd = EtcdServer(base, nodes.hub_address, netns=nodes.hub)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        etcd.start()
        print(f"etcd {etcd.url} in the hub namespace, healthy in {etcd.started_in * 1000:.0f} ms")
        for node in nodes.nodes:
            node.run("sh", "-c", f"mkdir -p /srv/state /srv/run && cat > /srv/policy.yaml <<'EOF'\n{POLICY}EOF")
        agents = {n.name: _agent(n, etcd.url) for n in nodes.nodes}
        procs.extend(agents.values())
        _registered(etcd, nodes, list(agents))
        a = nodes.nodes[0]
        lines = "".join(f"  {n.name}: {{}}\n" for n in nodes.nodes)
        request = f"etcd: {etcd.url}\nlease: {LEASE:g}s\ndeadline: 20s\nnodes:\n{lines}"
        a.run("sh", "-c", f"cat > /srv/cluster.yaml <<'EOF'\n{request}EOF")
        workers = [_worker(n) for n in nodes.nodes]
        procs.extend(workers)
        loose: list[float] = []
        together: list[float] = []
        skews: list[float] = []
        windows: dict[str, list[float]] = {"loose": [], "together": []}
        waits: dict[str, list[float]] = {"ready": [], "imaged": []}
        for r in range(args.rounds + 1):  # the first of each: a warm-up
            time.sleep(0.15)
            for w in workers:
                assert w.stdin is not None
                w.stdin.write(f"u{r}\n".encode())
                w.stdin.flush()
            answers = [json.loads(_line(w)) for w in workers]
            time.sleep(0.15)
            done = a.run(*SNAPCORE, "checkpoint", "--cluster", "/srv/cluster.yaml", "--id", f"c{r}", "--json")
            manifest = json.loads(done.stdout)
            own = [_manifest(n, f"c{r}") for n in nodes.nodes]
            if r == 0:
                continue
            loose.append(max(x["total"] for x in answers))
            together.append(max(m["timings"]["total"] for m in own))
            windows["loose"].append(max(x["window"] for x in answers))
            windows["together"].append(max(m["freeze_window_ms"] for m in own))
            skews.append(manifest["skew_ms"])
            for k in waits:
                waits[k].append(manifest["barrier_ms"][k])
        deaths = _deaths(nodes, etcd, agents, args.deaths)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        etcd.close()
        problems = nodes.close()
        shutil.rmtree(base, ignore_errors=True)
        if problems:
            print(f"teardown: {problems}", file=sys.stderr)
    med = statistics.median
    print(f"three idle ext4 nodes, fsfreeze; medians of {args.rounds} (ms, the slowest node's in-process total):")
    print(f"  three checkpoints at once, no coordination     {med(loose):8.2f}")
    print(f"  one cluster checkpoint, coordinated on etcd    {med(together):8.2f}")
    print(f"  added by the barrier: {ratio(med(together), med(loose))} (target <= +10 ms)")
    print(
        f"  the longest freeze window: {med(windows['together']):.2f} coordinated (it waits there for every node "
        f"to be imaged) against {med(windows['loose']):.2f}: {ratio(med(windows['together']), med(windows['loose']))}"
    )
    print("  the coordinator's waits for every node: " + ", ".join(f"{k} {med(v):.2f}" for k, v in waits.items()))
    print(f"  skew of the nodes' freeze instants: median {med(skews):.2f} ms, max {max(skews):.2f} (target <= 5 ms)")
    print(f"node B's agent SIGKILLed in its freeze window ({len(deaths)} times): the others thawed after (ms)")
    print(f"  median {med(deaths):.1f}, max {max(deaths):.1f}; the lease {LEASE * 1000:.0f} (target <= lease + 100)")
    return 0


def _agent(node: Node, url: str, *env: str) -> subprocess.Popen[bytes]:
    argv = ["env", "SNAPCORE_PLUGINS=fsfreeze", *env, *SNAPCORE, "agent", "--etcd", url]
    argv += ["--node", node.name, "--lease", f"{LEASE:g}s", "--policy", "/srv/policy.yaml"]
    return node.start("sh", "-c", 'exec "$@" 2>>/srv/agent.log', "agent", *argv)


def _worker(node: Node) -> subprocess.Popen[bytes]:
    argv = node.argv("env", "SNAPCORE_PLUGINS=fsfreeze", sys.executable, "-c", WORKER)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if _line(proc) != "ready":
        raise SystemExit("a worker did not start")
    return proc


def _line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        raise SystemExit(f"a worker died: exit {proc.wait()}")
    return line


def _manifest(node: Node, checkpoint_id: str) -> dict[str, Any]:
    text = node.run("cat", f"/srv/state/checkpoints/{checkpoint_id}/manifest.json").stdout
    return json.loads(text)  # type: ignore[no-any-return]


def _registered(etcd: EtcdServer, nodes: Nodes, names: list[str]) -> None:
    deadline = time.monotonic() + 60
    while True:
        argv = ["nsenter", f"--net=/run/netns/{nodes.hub}", "--", "etcdctl", f"--endpoints={etcd.url}"]
        keys = subprocess.run(
            [*argv, "get", "--prefix", "--keys-only", "/snapcore/agents/"],
            capture_output=True,
            text=True,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        ).stdout.split()
        if all(f"/snapcore/agents/{n}" in keys for n in names):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the agents did not register: {keys}")
        time.sleep(0.05)


def _note_death(proc: subprocess.Popen[bytes], died: list[float]) -> None:
    proc.wait()
    died.append(time.time())


def _deaths(nodes: Nodes, etcd: EtcdServer, agents: dict[str, subprocess.Popen[bytes]], n: int) -> list[float]:
    """B's agent dies in its freeze window; the others' thaw instants after its death (ms)."""
    a, b = nodes.nodes[0], nodes.nodes[1]
    found = []
    for i in range(n):
        agents["B"].kill()
        agents["B"].wait()
        # the dead one's registration expires with its lease: the new one waits for that
        agents["B"] = _agent(b, etcd.url, "SNAPCORE_FAULT=snapshot=kill")
        time.sleep(LEASE * 2.5)
        _registered(etcd, nodes, ["B"])
        died: list[float] = []
        watcher = threading.Thread(target=_note_death, args=(agents["B"], died))
        watcher.start()
        done = a.run(*SNAPCORE, "checkpoint", "--cluster", "/srv/cluster.yaml", "--id", f"d{i}", check=False)
        watcher.join(30)
        if done.returncode != 1 or not died:
            raise SystemExit(f"the death was not seen: exit {done.returncode}: {done.stderr}")
        thawed = []
        for node in (a, nodes.nodes[2]):
            m = _manifest(node, f"d{i}")
            frozen_at = (m.get("cluster") or {}).get("frozen_at")
            if frozen_at is None or m["freeze_window_ms"] is None:
                raise SystemExit(f"node {node.name} has no freeze instant: {m}")
            thawed.append(frozen_at + m["freeze_window_ms"] / 1000)
        found.append((max(thawed) - died[0]) * 1000)
    agents["B"].kill()
    agents["B"].wait()
    return found


if __name__ == "__main__":
    sys.exit(main())
