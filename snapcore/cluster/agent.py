"""``snapcore agent``: one node's part in cluster checkpoints.

The agent registers its node in etcd on a lease and watches for requests naming it.
For each, it runs an ordinary checkpoint of this node (the request's policy, paths,
tasks and payload) whose meeting points (:attr:`Transaction.barrier`) report to etcd
and wait for the coordinator's word:

* ``ready`` (prepared, nothing frozen) → wait for ``freeze``;
* ``imaged`` (every filesystem frozen and imaged, still frozen) → wait for ``payload``;
* ``dumped`` (the payload done, the tasks still frozen) → wait for ``resume`` (not
  when no node has a payload).

The coordinator says its word once every node has reported the point; a node that
sees every report itself goes on without waiting for the word (one hop less in the
window), and gives up as soon as it sees a node fail.

Every wait ends by itself: at the request's deadline (and, frozen, before the freeze
window's own), when the coordinator's lease is gone, when the agent's own lease is
lost (etcd unreachable: the node is cut off) or when the coordinator says ``abort``.
Then the checkpoint fails as any other does: everything is thawed and what it made is
discarded. If the agent itself dies, its guard process thaws the node (as for any
checkpoint) and reports it failed (:meth:`Agent._arm_guard`); its lease's expiry
tells the others too. A completed part stays only on the coordinator's ``commit``.

A cluster restore (``restore ID --cluster``) goes the same way with one meeting
point: ``restored`` (the files back and checked) → wait for ``start`` → the command.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore.cluster.etcd import Etcd, EtcdUnavailable, Lease
from snapcore.cluster.protocol import (
    ABORT,
    DISCARD,
    FAILED,
    LOST,
    RELEASES,
    RESTORE_OP,
    STATES,
    Keys,
    NodeSpec,
    Request,
    RestoreSpec,
    dumps,
    loads,
    request_from_json,
)
from snapcore.errors import CheckpointFailed, SnapcoreError, UsageError
from snapcore.log import get_logger
from snapcore.safety.cancel import Cancel
from snapcore.types import Rescue, RescueKind

if TYPE_CHECKING:
    from snapcore.plugins import Plugins
    from snapcore.store.manifest import Manifest
    from snapcore.transaction import TaskSpec
    from snapcore.transaction.core import Transaction

log = get_logger("snapcore.cluster")


#: The guard's key for reporting this node failed (:meth:`Agent._arm_guard`).
RESCUE_KEY = "cluster:report"
#: How long a new agent waits for a dead one's registration to expire (its lease).
REGISTER_WAIT = 15.0


class ClusterAborted(SnapcoreError):
    """The cluster checkpoint cannot go on here (another node, the coordinator, etcd
    or the deadline)."""


class Session:
    """What this node knows of one cluster checkpoint (or restore), updated from the
    watch (the client's loop thread) and waited on by the agent's main thread."""

    def __init__(self, request: Request, keys: Keys) -> None:
        self.request = request
        #: the keys of its operation (a checkpoint's, or a restore's)
        self.keys = keys
        self.phases: list[str] = []
        self.stop: str | None = None
        #: the coordinator said ``discard`` (why): this node's completed part goes
        self.discard: str | None = None
        #: every node's last report, as the watch saw it
        self.states: dict[str, str] = {}
        self.gone = False
        self.broken = False
        self._cond = threading.Condition()

    def reported(self, node: str, report: dict[str, Any] | None) -> None:
        """A node's report (None: its key is gone, its agent's lease expired)."""
        with self._cond:
            before = self.states.get(node)
            if report is None:
                if before not in ("done", "discarded", FAILED):
                    self.states[node] = LOST
                    self.stop = self.stop or f"node {node} was lost (its agent's etcd lease expired)"
            else:
                state = str(report.get("state"))
                self.states[node] = state
                if state == FAILED:
                    self.stop = self.stop or f"node {node} failed: {report.get('error') or 'no reason given'}"
            self._cond.notify_all()

    def _everyone_at(self, point: str) -> bool:
        """Every node has reported ``point`` (or later): what the coordinator waits for
        before its word; seen here, the node need not wait for that word."""
        want = STATES.index(point)
        states = [self.states.get(n) for n in self.request.nodes]
        return all(s in STATES and STATES.index(s) >= want for s in states)

    def said(self, phase: str, reason: str = "") -> None:
        with self._cond:
            if phase == ABORT:
                self.stop = self.stop or f"the coordinator aborted the checkpoint: {reason or 'no reason given'}"
            elif phase == DISCARD:
                self.discard = reason or "no reason given"
                self.stop = self.stop or f"the coordinator discarded the checkpoint: {self.discard}"
            elif phase not in self.phases:
                self.phases.append(phase)
            self._cond.notify_all()

    def give_up(self, reason: str, *, gone: bool = False, broken: bool = False) -> None:
        """Stop waiting: ``gone`` the coordinator's key expired, ``broken`` the watch
        broke (etcd unreachable: no word will be heard)."""
        with self._cond:
            self.stop = self.stop or reason
            self.gone = self.gone or gone
            self.broken = self.broken or broken
            self._cond.notify_all()

    def verdict(self, seconds: float, lost: threading.Event, cancel: Cancel) -> str:
        """After this node's part is done: ``commit`` or ``discard`` (the coordinator's
        word), ``gone`` (the coordinator died without one: its result decides), or
        ``unknown`` (etcd unreachable, the agent stopping, or no word in ``seconds``)."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while True:
                if "commit" in self.phases:
                    return "commit"
                if self.discard is not None:
                    return DISCARD
                if self.gone:
                    return "gone"
                if self.broken or lost.is_set() or cancel.is_set() or time.monotonic() > deadline:
                    return "unknown"
                self._cond.wait(0.05)

    def wait(self, point: str, seconds: float, lost: threading.Event, cancel: Cancel) -> float:
        """Until every node has reached ``point``: the coordinator's word for it
        (:data:`RELEASES`), or every node's report of it seen here first (one hop
        less); how long that took (s). Raises :class:`ClusterAborted` when a node
        failed or was lost, on an abort, a lost lease, a cancellation (the agent is
        stopping) or the deadline."""
        phase = RELEASES[point]
        t = time.monotonic()
        deadline = t + max(0.0, seconds)
        with self._cond:
            while True:
                if phase in self.phases or (self.stop is None and self._everyone_at(point)):
                    return time.monotonic() - t
                if self.stop is not None:
                    raise ClusterAborted(self.stop)
                if lost.is_set():
                    raise ClusterAborted("this node lost its etcd lease (cut off from etcd?)")
                if cancel.is_set():
                    raise ClusterAborted(f"the agent is stopping ({cancel.reason})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterAborted(f"no {phase!r} from the coordinator within {seconds:.3g}s")
                # woken by the watch; the lease is polled
                self._cond.wait(min(left, 0.05))


@dataclass
class Agent:
    etcd: Etcd
    keys: Keys
    node: str
    lease_ttl: float = 2.0
    policy: str | None = None
    state_dir: Path | None = None
    run_dir: Path | None = None
    plugins: Plugins | None = None
    cancel: Cancel = field(default_factory=Cancel)
    sessions: dict[str, Session] = field(default_factory=dict)
    _queue: queue.Queue[Session | str] = field(default_factory=queue.Queue)
    _lease: Lease | None = None
    _etcdctl: str | None = field(default_factory=lambda: shutil.which("etcdctl"))

    def serve(self, stop: threading.Event) -> None:
        """Register, then take requests until ``stop`` is set or etcd is lost."""
        lease = self._lease = self._register(stop)
        # a request put while this agent was starting (or restarting) is taken too, if
        # its coordinator is still there and this node has not answered it yet
        existing, revision = self.etcd.get_prefix(self.keys.checkpoints)
        for key, value in existing.items():
            found = self.keys.split(key)
            if found is not None and found[2] == "request":
                keys = self.keys.for_op(found[1])
                if keys.coordinator(found[0]) in existing and keys.node(found[0], self.node) not in existing:
                    self._event("put", key, value)
        self.etcd.watch_prefix(self.keys.checkpoints, revision + 1, self._event)
        log.info("agent for node %s registered at %s (lease %x)", self.node, self.etcd.endpoint, lease.id)
        try:
            while not stop.is_set():
                if lease.lost.is_set():
                    raise EtcdUnavailable(f"node {self.node}: the agent's etcd lease was lost")
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(item, str):
                    raise EtcdUnavailable(f"node {self.node}: {item}")
                if item.request.kind == "restore":
                    self._restore(item)
                else:
                    self._checkpoint(item)
        finally:
            lease.revoke()

    def _register(self, stop: threading.Event) -> Lease:
        """This node's key on a lease of its own. A previous agent of this node that
        died (restarted by systemd) holds the key until its lease expires, and etcd
        may not answer yet (starting, or the network coming up): both are waited
        for, :data:`REGISTER_WAIT` at most."""
        info = dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        where = self.keys.agent(self.node)
        end = time.monotonic() + REGISTER_WAIT
        lease: Lease | None = None
        while True:
            try:
                if lease is None or lease.lost.is_set():
                    lease = self.etcd.lease(self.lease_ttl)
                if self.etcd.create(where, info, lease):
                    return lease
                problem: SnapcoreError = UsageError(f"node {self.node!r} already has an agent registered ({where})")
            except EtcdUnavailable as exc:
                problem = exc
            if time.monotonic() > end or stop.is_set():
                if lease is not None:
                    lease.revoke()
                raise problem
            time.sleep(0.2)

    # -- from the watch (the client's loop thread) -------------------------------------

    def _event(self, kind: str, key: str, value: bytes) -> None:
        if kind == "error":
            reason = f"the etcd watch broke: {value.decode('utf-8', 'replace')}"
            for each in self.sessions.values():
                each.give_up(reason, broken=True)
            self._queue.put(reason)
            return
        where = self.keys.split(key)
        if where is None:
            return
        checkpoint_id, op, rest = where
        session = self.sessions.get(op + checkpoint_id)
        if rest == "request" and kind == "put" and session is None:
            try:
                request = request_from_json(loads(value))
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("ignoring a malformed cluster request at %s: %s", key, exc)
                return
            if request.kind != ("restore" if op == RESTORE_OP else "checkpoint"):
                log.warning("ignoring a cluster request at %s: a %s request", key, request.kind)
            elif self.node in request.nodes and request.id == checkpoint_id:
                session = self.sessions[op + checkpoint_id] = Session(request, self.keys.for_op(op))
                self._queue.put(session)
        elif session is None:
            return
        elif rest == "phase" and kind == "put":
            try:
                said = loads(value)
                session.said(str(said.get("phase")), str(said.get("reason") or ""))
            except (ValueError, UnicodeDecodeError):
                session.give_up("the coordinator's phase key holds no phase")
        elif rest == "coordinator" and kind == "delete":
            session.give_up("the coordinator is gone (its etcd lease expired)", gone=True)
        elif rest.startswith("nodes/"):
            node = rest[len("nodes/") :]
            if node not in session.request.nodes:
                return
            if kind == "delete":
                session.reported(node, None)
                return
            try:
                session.reported(node, loads(value))
            except (ValueError, UnicodeDecodeError):
                session.reported(node, {"state": FAILED, "error": "its report is not JSON"})

    # -- the checkpoint (the agent's main thread) --------------------------------------

    def _report(self, session: Session, state: str, **extra: Any) -> None:
        value = dumps({"state": state, "at": time.time(), **extra})
        self.etcd.put(session.keys.node(session.request.id, self.node), value, self._lease)

    def _checkpoint(self, session: Session) -> None:
        from snapcore import api

        request = session.request
        spec = request.nodes[self.node]
        assert isinstance(spec, NodeSpec)
        lost = self._lease.lost if self._lease else threading.Event()
        waited: dict[str, float] = {}
        state_dirs: list[Path] = []

        def meet(point: str, txn: Transaction) -> None:
            if point == "end":
                txn.watchdog.thawed(RESCUE_KEY)
                return
            if point == "dumped" and not request.payloads:  # no payload anywhere: nothing to wait for
                return
            extra: dict[str, Any] = {}
            seconds = request.deadline
            if point == "ready":
                txn.manifest.cluster = {
                    "node": self.node,
                    "coordinator": request.coordinator,
                    "state": "pending",
                    "waited_ms": waited,
                }
                state_dirs.append(txn.state_dir)
            if point == "imaged":
                frozen = [t for t in (txn.window.frozen_wall, txn.tasks and txn.tasks.stopped_wall) if t]
                extra["frozen_at"] = min(frozen) if frozen else time.time()
                assert txn.manifest.cluster is not None
                txn.manifest.cluster["frozen_at"] = extra["frozen_at"]
                if txn.window.frozen_wall is not None:  # the window's own deadline comes first
                    left = txn.deadline_s - (time.time() - txn.window.frozen_wall)
                    seconds = min(seconds, max(0.0, left * 0.9))
            try:
                self._report(session, point, **extra)
            except EtcdUnavailable as exc:
                raise ClusterAborted(f"cannot report {point!r}: {exc}") from None
            if point == "ready":  # armed while the others report (off the critical path), before any freeze
                self._arm_guard(session, txn)
            waited[point] = round(session.wait(point, seconds, lost, self.cancel) * 1000, 3)

        try:
            tasks, payload = _tasks_of(spec)
            manifest = api.checkpoint(
                list(spec.paths),
                policy=spec.policy or self.policy,
                checkpoint_id=request.id,
                state_dir=self.state_dir,
                run_dir=self.run_dir,
                payload=payload,
                plugins=self.plugins,
                cancel=self.cancel,
                tasks=tasks,
                barrier=meet,
            )
        except CheckpointFailed as exc:
            self._finish(session, FAILED, str(exc), exc.manifest)
        except SnapcoreError as exc:  # refused before it started: a bad policy, no such task
            self._finish(session, FAILED, str(exc), None)
        else:
            self._finish(session, "done", None, manifest)
            self._settle(session, manifest, state_dirs[0], lost)
        finally:
            self.sessions.pop(session.keys.op + request.id, None)

    def _settle(self, session: Session, manifest: Manifest, state_dir: Path, lost: threading.Event) -> None:
        """This node's part is complete; the coordinator decides whether it stays (all
        nodes completed theirs) or goes. A coordinator that died first leaves its
        result in etcd, or none (it goes). Without etcd, the part stays, marked
        ``pending`` in its manifest (``cluster.state``), for the result to decide."""
        request = session.request
        verdict = session.verdict(request.finish, lost, self.cancel)
        if verdict == "gone":
            try:
                raw = self.etcd.get(session.keys.result(request.id))
                result = loads(raw) if raw is not None else {}
                verdict = "commit" if result.get("outcome") == "ok" else DISCARD
                session.discard = session.discard or "the coordinator died before every node was done"
            except (EtcdUnavailable, ValueError, UnicodeDecodeError):
                verdict = "unknown"
        if verdict == DISCARD:
            self._discard(session, state_dir)
            return
        state = "committed" if verdict == "commit" else "pending"
        if state == "pending":
            log.warning(
                "cluster checkpoint %s: no word from the coordinator on this node's part: kept, marked pending "
                "(the cluster manifest, etcd key %s, decides)",
                request.id,
                session.keys.result(request.id),
            )
        assert manifest.cluster is not None
        manifest.cluster["state"] = state
        try:
            manifest.write(state_dir)
        except (OSError, SnapcoreError) as exc:
            log.warning("cluster checkpoint %s: cannot mark this node's manifest %s: %s", request.id, state, exc)

    def _restore(self, session: Session) -> None:
        """This node's part of a cluster restore: ``snapcore restore`` as its command
        line would do it (the files put back and checked); the payload (``criu
        restore``) only once every node has its files back."""
        from snapcore.cli.commands import restore_then
        from snapcore.cli.parser import parse_args

        request = session.request
        spec = request.nodes[self.node]
        assert isinstance(spec, RestoreSpec)
        lost = self._lease.lost if self._lease else threading.Event()
        argv = [*(["--state-dir", str(self.state_dir)] if self.state_dir else []), "--run-dir", str(self.run_dir)]

        def meet() -> None:
            self._report(session, "restored")
            session.wait("restored", request.finish, lost, self.cancel)

        try:
            restore_then(parse_args([*argv, *spec.argv(request.id)]), list(spec.payload) or None, before_command=meet)
        except SnapcoreError as exc:
            log.warning("cluster restore %s failed on node %s: %s", request.id, self.node, exc)
            self._report_quietly(session, FAILED, error=str(exc))
        else:
            self._report_quietly(session, "done", error=None)
        finally:
            self.sessions.pop(session.keys.op + request.id, None)

    def _report_quietly(self, session: Session, state: str, **extra: Any) -> None:
        try:
            self._report(session, state, host=socket.gethostname(), **extra)
        except EtcdUnavailable as exc:
            log.warning("cluster %s %s: cannot report %r: %s", session.request.kind, session.request.id, state, exc)

    def _discard(self, session: Session, state_dir: Path) -> None:
        """The cluster checkpoint failed after this node completed its part: delete it
        (exports, images, manifest), as ``snapcore delete ID`` would."""
        from snapcore import api

        request = session.request
        log.warning("cluster checkpoint %s: discarding this node's part: %s", request.id, session.discard)
        problems = []
        try:
            for deletion in api.delete([request.id], state_dir=state_dir, run_dir=self.run_dir, plugins=self.plugins):
                problems.extend(deletion.errors)
        except SnapcoreError as exc:
            problems.append(str(exc))
        try:
            self._report(session, "discarded", error="; ".join(problems) or None)
        except EtcdUnavailable as exc:
            log.warning("cluster checkpoint %s: cannot report the discard: %s", request.id, exc)

    def _arm_guard(self, session: Session, txn: Transaction) -> None:
        """If this agent dies from now until the checkpoint ends, its guard (which
        thaws this node) also reports the node failed, at once: the other nodes need
        not wait for the agent's lease to expire (etcd notices that ~0.2-0.3 s after
        its TTL). ``etcdctl`` (Debian's etcd-client) does it: the guard imports
        nothing while filesystems are frozen. Without it, the lease alone tells."""
        etcdctl = self._etcdctl
        if etcdctl is None or self._lease is None:
            log.info("etcdctl is not installed (etcd-client): a death of this agent is told by its lease alone")
            return
        report = dumps({"state": FAILED, "error": f"node {self.node}: its agent died; its guard thawed it"})
        argv = (
            etcdctl,
            f"--endpoints={self.etcd.endpoint}",
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "put",
            f"--lease={self._lease.id:x}",
            session.keys.node(session.request.id, self.node),
            report.decode(),
        )
        txn.watchdog.watch({RESCUE_KEY: Rescue(kind=RescueKind.COMMAND, argv=argv)})
        txn.watchdog.freezing(RESCUE_KEY)

    def _finish(self, session: Session, state: str, error: str | None, manifest: Any) -> None:
        request = session.request
        extra: dict[str, Any] = {"error": error}
        if manifest is not None:
            extra.update(
                outcome=manifest.outcome,
                freeze_window_ms=manifest.freeze_window_ms,
                frozen_at=(manifest.cluster or {}).get("frozen_at"),
                waited_ms=(manifest.cluster or {}).get("waited_ms"),
                targets=[{"mount": t.mount, "outcome": t.outcome, "image": t.image} for t in manifest.targets],
            )
        if error:
            log.warning("cluster checkpoint %s failed on node %s: %s", request.id, self.node, error)
        self._report_quietly(session, state, **extra)


def _tasks_of(spec: NodeSpec) -> tuple[TaskSpec | None, list[str] | None]:
    """A node's tasks and payload. A container's tasks are its cgroup, frozen by
    snapcore at the cluster's freeze; its payload the runtime's checkpoint, whose CRIU
    dumps the frozen cgroup and leaves it frozen (or ends the container)."""
    from snapcore.transaction import TaskSpec

    payload = list(spec.payload) or None
    if spec.container is None:
        if spec.pid is None and spec.cgroup is None:
            return None, payload
        return TaskSpec(pid=spec.pid, cgroup=spec.cgroup), payload
    from snapcore.tasks.cgroups import freezer_cgroup_of
    from snapcore.tasks.runtimes import ContainerRef, checkpoint_command, container_pid

    ref = ContainerRef.parse(spec.container)
    argv = checkpoint_command(ref, payload)
    pid = container_pid(ref, argv)
    cgroup = freezer_cgroup_of(pid)
    if cgroup is None:
        raise SnapcoreError(f"container {ref} (pid {pid}): no cgroup of it to freeze (no freezer hierarchy?)")
    return TaskSpec(cgroup=cgroup, container=str(ref)), argv
