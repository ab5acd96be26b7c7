"""A cluster checkpoint's keys in etcd, its request, and the nodes' reports.

Under a prefix (``/snapcore`` by default):

``agents/NODE``
    an agent's registration, on its lease: gone within the lease's TTL once the
    agent is dead or cut off.
``checkpoints/ID/request``
    what the coordinator asks of every node (:class:`Request`), written once.
``checkpoints/ID/coordinator``
    its absence means the coordinator is gone, and every node gives up by itself.
``checkpoints/ID/phase``
    the coordinator's word (:data:`PHASES`): ``freeze`` once every node is ready,
    ``payload`` once every node is imaged, ``resume`` once every node's payload is
    done (at once when no node has one); ``abort`` (with a reason) instead at any time before ``resume``; after it,
    ``commit`` once every node is done, or ``discard`` when one failed or was lost
    (a node cut off after its last report never hears ``resume`` and gives up): the
    nodes that completed their part delete it, so that no half of the cluster's
    checkpoint stays.
``checkpoints/ID/nodes/NODE``
    a node's report (:data:`STATES`), on its agent's lease.
``checkpoints/ID/result``
    the cluster manifest, once the coordinator has it: the only key that stays (the
    request, the coordinator's key and the phase are on the coordinator's lease).

Every value is JSON, read as untrusted input: a value that is not what it should be
is a failed node or an aborted checkpoint, never a crash of the agent.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from snapcore.errors import PolicyError, PolicyProblems, UsageError

DEFAULT_PREFIX = "/snapcore"
#: The keys of a cluster restore, under its checkpoint's.
RESTORE_OP = "restore/"

#: The coordinator's word, in order; ``abort`` may replace any of them. A restore's:
#: ``start`` once every node has its files back (and checked).
PHASES = ("freeze", "payload", "resume", "commit", "start")
ABORT = "abort"
DISCARD = "discard"
#: A node's reports, in order; ``failed`` may replace any of them before ``done``.
STATES = ("ready", "imaged", "dumped", "restored", "done", "discarded")
FAILED = "failed"
#: What the others make of a node whose report key vanished (its agent's lease expired).
LOST = "lost"
#: A meeting point of the transaction → the phase that lets a node go on from it.
RELEASES = {"ready": "freeze", "imaged": "payload", "dumped": "resume", "restored": "start"}

#: A node's name: what an agent registers as (a host name, usually).
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: A value larger than this is not one of ours.
MAX_VALUE = 1 << 20


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``http://HOST:PORT`` (or ``HOST:PORT``): one etcd member's client URL."""
        text = url if "//" in url else f"http://{url}"
        parts = urllib.parse.urlsplit(text)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(f"etcd endpoint {url!r}: give http://HOST:PORT (TLS is not supported yet)")
        try:
            port = parts.port or 2379
        except ValueError:
            raise UsageError(f"etcd endpoint {url!r}: bad port") from None
        return cls(parts.hostname, port)

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}"


def keys(prefix: str) -> Keys:
    return Keys(prefix.rstrip("/") or DEFAULT_PREFIX)


@dataclass(frozen=True, slots=True)
class Keys:
    """The keys of one kind of operation: a checkpoint's (``op`` empty) or a restore's
    of it (``op`` :data:`RESTORE_OP`: the same keys under ``checkpoints/ID/restore/``)."""

    prefix: str
    op: str = ""

    def for_op(self, op: str) -> Keys:
        return Keys(self.prefix, op)

    @property
    def agents(self) -> str:
        return f"{self.prefix}/agents/"

    def agent(self, node: str) -> str:
        return f"{self.agents}{node}"

    @property
    def checkpoints(self) -> str:
        return f"{self.prefix}/checkpoints/"

    def checkpoint(self, checkpoint_id: str) -> str:
        return f"{self.checkpoints}{checkpoint_id}/{self.op}"

    def request(self, checkpoint_id: str) -> str:
        return f"{self.checkpoint(checkpoint_id)}request"

    def coordinator(self, checkpoint_id: str) -> str:
        return f"{self.checkpoint(checkpoint_id)}coordinator"

    def phase(self, checkpoint_id: str) -> str:
        return f"{self.checkpoint(checkpoint_id)}phase"

    def nodes(self, checkpoint_id: str) -> str:
        return f"{self.checkpoint(checkpoint_id)}nodes/"

    def node(self, checkpoint_id: str, node: str) -> str:
        return f"{self.nodes(checkpoint_id)}{node}"

    def result(self, checkpoint_id: str) -> str:
        return f"{self.checkpoint(checkpoint_id)}result"

    def split(self, key: str) -> tuple[str, str, str] | None:
        """``checkpoints/ID[/restore]/REST`` → (ID, op, REST); None for any other key."""
        if not key.startswith(self.checkpoints):
            return None
        checkpoint_id, _, rest = key[len(self.checkpoints) :].partition("/")
        op = RESTORE_OP if rest.startswith(RESTORE_OP) else ""
        rest = rest[len(op) :]
        return (checkpoint_id, op, rest) if checkpoint_id and rest else None


def dumps(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def loads(raw: bytes) -> dict[str, Any]:
    """A JSON object from etcd; ``ValueError`` for anything else."""
    if len(raw) > MAX_VALUE:
        raise ValueError(f"{len(raw)} bytes: too large")
    value = json.loads(raw.decode("utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"a JSON object expected, got {type(value).__name__}")
    return value


# -- the request ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """What one node checkpoints: its policy (a path on that node; None: the agent's
    own), paths, the tasks (``pid`` or ``cgroup``), and the payload run while every
    node is frozen."""

    policy: str | None = None
    paths: tuple[str, ...] = ()
    pid: int | None = None
    cgroup: str | None = None
    payload: tuple[str, ...] = ()
    #: ``RUNTIME:ID``: the container's cgroup is frozen, and the payload is the
    #: runtime's checkpoint of it (``RUNTIME checkpoint ID`` if none is given)
    container: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "paths": list(self.paths),
            "pid": self.pid,
            "cgroup": self.cgroup,
            "payload": list(self.payload),
            "container": self.container,
        }


@dataclass(frozen=True, slots=True)
class RestoreSpec:
    """What one node restores of a cluster checkpoint, as ``snapcore restore`` would:
    its own part (by the checkpoint's id), or ``from_dir`` an export directory on that
    node; ``to`` a directory, or ``in_place``; ``mount`` only; then, once every node
    has its files back and checked, ``payload`` (``criu restore ...``)."""

    from_dir: str | None = None
    to: str | None = None
    in_place: bool = False
    mount: str | None = None
    no_check: bool = False
    payload: tuple[str, ...] = ()

    def argv(self, checkpoint_id: str) -> list[str]:
        """``snapcore restore``'s arguments for it (before ``--``)."""
        argv = ["restore", *(["--from", self.from_dir] if self.from_dir else [checkpoint_id])]
        argv += ["--to", self.to] if self.to else ["--in-place"]
        argv += ["--mount", self.mount] if self.mount else []
        return argv + (["--no-check"] if self.no_check else [])

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.from_dir,
            "to": self.to,
            "in_place": self.in_place,
            "mount": self.mount,
            "no_check": self.no_check,
            "payload": list(self.payload),
        }


@dataclass(frozen=True, slots=True)
class Request:
    """A cluster checkpoint: its id, the nodes, and how long each wait may last
    (``deadline``, seconds: for every node to be ready, imaged, dumped; also each
    node's own bound on its waits) and ``finish`` (for the nodes' exports after
    ``resume``)."""

    id: str
    nodes: Mapping[str, NodeSpec | RestoreSpec]
    deadline: float = 10.0
    finish: float = 600.0
    coordinator: str = ""
    #: ``checkpoint`` or ``restore``
    kind: str = "checkpoint"

    @property
    def payloads(self) -> bool:
        """Whether a node runs a payload: if none does, nobody waits at ``dumped``."""
        return any(spec.payload for spec in self.nodes.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "nodes": {name: spec.to_json() for name, spec in self.nodes.items()},
            "deadline": self.deadline,
            "finish": self.finish,
            "coordinator": self.coordinator,
            "kind": self.kind,
        }


_NODE_KEYS = ("policy", "paths", "pid", "cgroup", "container", "payload")
_RESTORE_KEYS = ("from", "to", "in_place", "mount", "no_check", "payload")
KINDS = ("checkpoint", "restore")


def restore_spec(raw: object, where: str) -> RestoreSpec:
    """A node's part of a cluster restore: ``ValueError`` naming ``where`` and the key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a mapping of {', '.join(_RESTORE_KEYS)} expected")
    unknown = sorted(set(raw) - set(_RESTORE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_RESTORE_KEYS)})")
    for key in ("from", "to", "mount"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, str) and value.startswith("/")):
            raise ValueError(f"{where}: key {key!r}: an absolute path on that node expected")
    in_place, no_check, payload = raw.get("in_place", False), raw.get("no_check", False), raw.get("payload") or []
    if not isinstance(in_place, bool) or not isinstance(no_check, bool):
        raise ValueError(f"{where}: keys 'in_place' and 'no_check': true or false")
    if bool(raw.get("to")) == in_place:
        raise ValueError(f"{where}: give 'to: DIR' or 'in_place: true' (one of them)")
    if raw.get("from") and in_place:
        raise ValueError(f"{where}: an export ('from') is restored 'to' a directory, not in place")
    if not isinstance(payload, list) or not all(isinstance(a, str) for a in payload):
        raise ValueError(f"{where}: key 'payload': a command line (a list of strings) expected")
    return RestoreSpec(raw.get("from"), raw.get("to"), in_place, raw.get("mount"), no_check, tuple(payload))


def node_spec(raw: object, where: str) -> NodeSpec:
    """A node's part of a request (from a request file or from etcd): ``ValueError``
    naming ``where`` and the key for anything that is not what it should be."""
    if raw is None:
        return NodeSpec()
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: a mapping of {', '.join(_NODE_KEYS)} expected")
    unknown = sorted(set(raw) - set(_NODE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_NODE_KEYS)})")
    policy, paths, pid = raw.get("policy"), raw.get("paths") or [], raw.get("pid")
    cgroup, payload = raw.get("cgroup"), raw.get("payload") or []
    if policy is not None and not (isinstance(policy, str) and policy.startswith("/")):
        raise ValueError(f"{where}: key 'policy': an absolute path on that node expected")
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise ValueError(f"{where}: key 'paths': a list of absolute paths expected")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
        raise ValueError(f"{where}: key 'pid': a process id expected")
    if cgroup is not None and not (isinstance(cgroup, str) and cgroup):
        raise ValueError(f"{where}: key 'cgroup': a cgroup path expected")
    container = raw.get("container")
    if container is not None:
        from snapcore.tasks.runtimes import ContainerRef

        try:
            ContainerRef.parse(container if isinstance(container, str) else "")
        except UsageError as exc:
            raise ValueError(f"{where}: key 'container': {exc}") from None
    if sum(x is not None for x in (pid, cgroup, container)) > 1:
        raise ValueError(f"{where}: give one of 'pid', 'cgroup', 'container'")
    if not isinstance(payload, list) or not all(isinstance(a, str) for a in payload):
        raise ValueError(f"{where}: key 'payload': a command line (a list of strings) expected")
    return NodeSpec(policy, tuple(paths), pid, cgroup, tuple(payload), container)


def request_from_json(data: Mapping[str, Any]) -> Request:
    """A request read from etcd (untrusted): ``ValueError`` if it is not one."""
    checkpoint_id, nodes = data.get("id"), data.get("nodes")
    if not isinstance(checkpoint_id, str) or not isinstance(nodes, Mapping) or not nodes:
        raise ValueError("a request has an 'id' and 'nodes'")
    kind = data.get("kind", "checkpoint")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {str(kind)[:40]!r}")
    parse = restore_spec if kind == "restore" else node_spec
    specs: dict[str, NodeSpec | RestoreSpec] = {}
    for name, raw in nodes.items():
        if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
            raise ValueError(f"bad node name {str(name)[:70]!r}")
        specs[name] = parse(raw, f"node {name}")
    deadline, finish = data.get("deadline", 10.0), data.get("finish", 600.0)
    for key, value in (("deadline", deadline), ("finish", finish)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
            raise ValueError(f"{key!r}: a number of seconds expected")
    coordinator = data.get("coordinator", "")
    return Request(
        checkpoint_id,
        specs,
        float(deadline),
        float(finish),
        coordinator if isinstance(coordinator, str) else "",
        kind,
    )


@dataclass(frozen=True, slots=True)
class ClusterFile:
    """A request file (``checkpoint --cluster FILE``): where etcd is, and the request."""

    endpoint: str
    prefix: str
    lease: float
    nodes: Mapping[str, NodeSpec | RestoreSpec]
    deadline: float
    finish: float
    kind: str = "checkpoint"


_FILE_KEYS = ("etcd", "prefix", "lease", "deadline", "finish", "nodes")


def load_cluster_file(path: str, kind: str = "checkpoint") -> ClusterFile:
    """Read and check a request file (of a checkpoint, or with ``kind`` ``restore``
    of a restore); every problem names the file, line and key."""
    from snapcore.policy.document import load_yaml
    from snapcore.policy.model import YMap, parse_duration

    doc, _ = load_yaml(path)
    problems: list[PolicyError] = []

    def bad(message: str, key: str | None, line: int | None) -> None:
        problems.append(PolicyError(message, file=path, line=line, key=key))

    if not isinstance(doc, YMap):
        raise PolicyError("a cluster request is a mapping with 'etcd' and 'nodes'", file=path, line=1)
    lines = getattr(doc, "lines", {})
    for key in sorted(set(doc) - set(_FILE_KEYS)):
        bad(f"unknown key (known: {', '.join(_FILE_KEYS)})", key, lines.get(key))
    endpoint = doc.get("etcd")
    if not isinstance(endpoint, str) or not endpoint:
        bad("the etcd member to talk to, http://HOST:PORT", "etcd", lines.get("etcd", doc.line))
    else:
        try:
            Endpoint.parse(endpoint)
        except UsageError as exc:
            bad(str(exc), "etcd", lines.get("etcd"))
    prefix = doc.get("prefix", DEFAULT_PREFIX)
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        bad("a key prefix starting with '/'", "prefix", lines.get("prefix"))
    durations = {"lease": 2.0, "deadline": 10.0, "finish": 600.0}
    for key in durations:
        if key in doc:
            try:
                durations[key] = parse_duration(doc[key])
                if durations[key] <= 0:
                    raise ValueError("a duration above zero")
            except ValueError as exc:
                bad(str(exc), key, lines.get(key))
    nodes = doc.get("nodes")
    specs: dict[str, NodeSpec | RestoreSpec] = {}
    parse = restore_spec if kind == "restore" else node_spec
    if not isinstance(nodes, YMap) or not nodes:
        bad("a mapping of node names to what each checkpoints", "nodes", lines.get("nodes", doc.line))
    else:
        for name, raw in nodes.items():
            line = nodes.lines.get(name)
            if not NODE_NAME.fullmatch(str(name)):
                bad(f"node name {str(name)[:70]!r}: letters, digits, '.', '_', '-'", "nodes", line)
                continue
            try:
                specs[str(name)] = parse(raw, f"node {name}")
            except ValueError as exc:
                bad(str(exc), "nodes", line)
    if problems:
        raise PolicyProblems(problems)
    return ClusterFile(
        endpoint=str(endpoint),
        prefix=str(prefix),
        lease=durations["lease"],
        nodes=specs,
        deadline=durations["deadline"],
        finish=durations["finish"],
        kind=kind,
    )
