"""``snapcore checkpoint --cluster FILE``: the coordinator of a cluster checkpoint.

It holds a lease for as long as it runs (its key under the checkpoint: when it dies,
the key expires and every node gives up by itself), writes the request, and moves
the nodes from one meeting point to the next only when all of them are there:
``freeze`` once all are ready, ``payload`` once all are imaged (each still frozen),
``resume`` once every payload is done. A node that fails, whose agent's lease expires,
or that is not there by the deadline makes it say ``abort``. At the end it writes the
cluster manifest (:func:`cluster_manifest_path`): every node's outcome, the waits at
each meeting point, and the skew between the nodes' freeze instants.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapcore.cluster.etcd import Etcd, EtcdUnavailable, Lease
from snapcore.cluster.protocol import ABORT, DISCARD, FAILED, LOST, STATES, ClusterFile, Keys, Request, dumps, loads
from snapcore.cluster.record import cluster_manifest_path
from snapcore.errors import SnapcoreError, UsageError
from snapcore.log import get_logger
from snapcore.safety.cancel import Cancel
from snapcore.store.manifest import utc_now

log = get_logger("snapcore.cluster")


class ClusterFailed(SnapcoreError):
    """The cluster checkpoint failed; :attr:`manifest` says where and why."""

    def __init__(self, message: str, manifest: dict[str, Any]) -> None:
        super().__init__(message)
        self.manifest = manifest


class _Stop(Exception):
    """A wait ended without every node there (the reason is the message)."""


@dataclass
class Coordinator:
    etcd: Etcd
    keys: Keys
    file: ClusterFile
    checkpoint_id: str
    state_dir: Path
    cancel: Cancel = field(default_factory=Cancel)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _broken: str | None = None
    _resumed: bool = False
    _lease: Lease | None = None

    def run(self) -> dict[str, Any]:
        """The whole cluster checkpoint (or, for a request file of ``kind`` restore,
        the cluster restore); its manifest, written (a restore's: into etcd only).
        Raises :class:`ClusterFailed` (with the manifest) when it failed,
        :class:`UsageError` before anything was asked of a node (a node without an
        agent)."""
        restore = self.file.kind == "restore"
        what = "cluster restore" if restore else "cluster checkpoint"
        nodes = list(self.file.nodes)
        agents, _ = self.etcd.get_prefix(self.keys.agents)
        missing = [n for n in nodes if self.keys.agent(n) not in agents]
        if missing:
            raise UsageError(
                f"no agent registered for node {', '.join(missing)} at {self.etcd.endpoint} "
                f"(is 'snapcore agent --node NAME' running there?)"
            )
        request = Request(
            self.checkpoint_id,
            self.file.nodes,
            self.file.deadline,
            self.file.finish,
            coordinator=f"{socket.gethostname()}:{os.getpid()}",
            kind=self.file.kind,
        )
        if not restore:  # an id is used once: what it names is never written over
            kept = cluster_manifest_path(self.state_dir, self.checkpoint_id)
            if os.path.lexists(kept) or self.etcd.get(self.keys.result(self.checkpoint_id)) is not None:
                raise UsageError(f"cluster checkpoint {self.checkpoint_id!r} already exists (its cluster manifest)")
        lease = self.etcd.lease(self.file.lease)
        coordinator = dumps({"pid": os.getpid(), "host": socket.gethostname()})
        if not self.etcd.create(self.keys.coordinator(self.checkpoint_id), coordinator, lease):
            lease.revoke()
            raise UsageError(f"{what} {self.checkpoint_id!r} is under way already (its key is in etcd)")
        manifest: dict[str, Any] = {
            "id": self.checkpoint_id,
            "kind": "cluster-restore" if restore else "cluster",
            "outcome": "failed",
            "started": utc_now(),
            "etcd": str(self.etcd.endpoint),
            "prefix": self.keys.prefix,
            "nodes": {},
            "barrier_ms": {},
            "error": None,
        }
        try:
            _, revision = self.etcd.get_prefix(self.keys.checkpoint(self.checkpoint_id))
            self.etcd.watch_prefix(self.keys.nodes(self.checkpoint_id), revision + 1, self._event)
            self._lease = lease  # the request and the phases go with it: only the result stays
            if not self.etcd.create(self.keys.request(self.checkpoint_id), dumps(request.to_json()), lease):
                raise _Stop(f"{what} {self.checkpoint_id!r} already has a request in etcd")
            if restore:
                self._restore_sequence(manifest, lease.lost)
            else:
                self._sequence(request, manifest, lease.lost)
            manifest["outcome"] = "ok"
        except _Stop as stop:
            manifest["error"] = str(stop)
            if not self._resumed:  # after 'resume', 'discard' was said instead
                self._abort(str(stop), lease.lost)
        except EtcdUnavailable as exc:
            manifest["error"] = f"lost etcd: {exc}"
        finally:
            manifest["finished"] = utc_now()
            self._record_nodes(manifest)
            self._write(manifest, local=not restore)
            lease.revoke()
        if manifest["outcome"] != "ok":
            raise ClusterFailed(f"{what} {self.checkpoint_id} failed: {manifest['error']}", manifest)
        return manifest

    def _restore_sequence(self, manifest: dict[str, Any], lost: threading.Event) -> None:
        """Every node puts its files back (and checks them: ``restored``); then, and only
        if all did, ``start``: each runs its command (``criu restore``)."""
        failed = self._meet_all([("restored", "start")], self.file.finish, manifest, lost)
        if failed:
            raise _Stop(f"after the start, {self._describe(failed)}")

    # -- the sequence --------------------------------------------------------------

    def _sequence(self, request: Request, manifest: dict[str, Any], lost: threading.Event) -> None:
        points = [("ready", "freeze"), ("imaged", "payload"), ("dumped", "resume")]
        if not request.payloads:  # the nodes do not stop at 'dumped'
            points = points[:2]
        failed = self._meet_all(points, self.file.deadline, manifest, lost)
        if failed:
            reason = f"after the freeze, {self._describe(failed)}"
            self._discard(reason, lost)
            raise _Stop(reason)
        self._say("commit")

    def _meet_all(
        self, points: list[tuple[str, str]], seconds: float, manifest: dict[str, Any], lost: threading.Event
    ) -> dict[str, dict[str, Any]]:
        """At each meeting point, once every node is there, the word that lets them go
        on (its wait into ``barrier_ms``); then every node's end. The nodes that did
        not end ``done``."""
        for point, phase in points:
            t = time.monotonic()
            self._wait_all(point, seconds, lost)
            self._say(phase)
            manifest["barrier_ms"][point] = round((time.monotonic() - t) * 1000, 3)
        self._resumed = True  # the nodes go on to their end: nothing is aborted after this
        self._wait_all("done", self.file.finish, lost)
        return {n: r for n, r in self.reports.items() if r.get("state") != "done"}

    def _discard(self, reason: str, lost: threading.Event) -> None:
        """Some nodes completed their part, another did not (it failed, or was lost
        after its last report): the complete parts are deleted, so that no half of
        the checkpoint stays; wait, a deadline at most, for each to say so."""
        log.warning("cluster checkpoint %s: discarding the nodes' parts: %s", self.checkpoint_id, reason)
        self._say(DISCARD, reason)
        done = [n for n, r in self.reports.items() if r.get("state") == "done"]
        self._await_last_word(done, ("discarded", LOST), lost)

    def _await_last_word(self, nodes: list[str], final: tuple[str, ...], lost: threading.Event) -> None:
        """Until each of ``nodes`` reported one of ``final``: the deadline at most, and
        not past etcd's loss (the nodes act by themselves; this only records it)."""
        end = time.monotonic() + self.file.deadline
        with self._cond:
            while time.monotonic() < end and self._broken is None and not lost.is_set():
                if all(self.reports.get(n, {}).get("state") in final for n in nodes):
                    return
                self._cond.wait(0.05)

    def _wait_all(self, state: str, seconds: float, lost: threading.Event) -> None:
        """Until every node has reported ``state`` (or later); :class:`_Stop` when one
        failed or was lost, etcd broke, the coordinator was cancelled, or the deadline."""
        want = STATES.index(state)
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                behind = [n for n in self.file.nodes if self._rank(n) < want]
                bad = {n: r for n, r in self.reports.items() if r.get("state") in (FAILED, LOST)}
                if bad and state != "done":
                    raise _Stop(self._describe(bad))
                if not behind:
                    return
                if self._broken is not None:
                    raise _Stop(self._broken)
                if lost.is_set():
                    raise _Stop("the coordinator lost its etcd lease")
                if self.cancel.is_set():
                    raise _Stop(f"the coordinator was cancelled ({self.cancel.reason})")
                left = end - time.monotonic()
                if left <= 0:
                    raise _Stop(f"node {', '.join(behind)} did not report {state!r} within {seconds:.3g}s")
                self._cond.wait(min(left, 0.05))

    def _rank(self, node: str) -> int:
        state = self.reports.get(node, {}).get("state")
        if state in (FAILED, LOST):
            return len(STATES)  # final: nothing more will come
        return STATES.index(state) if state in STATES else -1

    def _say(self, phase: str, reason: str | None = None) -> None:
        said = dumps({"phase": phase, "reason": reason, "at": time.time()})
        self.etcd.put(self.keys.phase(self.checkpoint_id), said, self._lease)

    def _abort(self, reason: str, lost: threading.Event) -> None:
        """Every node gives up (each would by itself, at its deadline): wait, a
        deadline at most, for their last word."""
        log.warning("cluster checkpoint %s: aborting: %s", self.checkpoint_id, reason)
        try:
            self._say(ABORT, reason)
        except EtcdUnavailable as exc:
            log.warning("cannot tell the nodes to abort (they give up by themselves): %s", exc)
            return
        self._await_last_word(list(self.file.nodes), (FAILED, LOST, "done"), lost)

    @staticmethod
    def _describe(bad: Mapping[str, Mapping[str, Any]]) -> str:
        parts = []
        for node, report in bad.items():
            if report.get("state") == LOST:
                parts.append(f"node {node} was lost (its agent's etcd lease expired)")
            else:
                parts.append(f"node {node} failed: {report.get('error') or 'no reason given'}")
        return "; ".join(parts)

    # -- from the watch ------------------------------------------------------------

    def _event(self, kind: str, key: str, value: bytes) -> None:
        with self._cond:
            if kind == "error":
                self._broken = f"the etcd watch broke: {value.decode('utf-8', 'replace')}"
            else:
                node = key.rpartition("/")[2]
                if node in self.file.nodes:
                    if kind == "delete":
                        if self.reports.get(node, {}).get("state") not in (FAILED, "done", "discarded"):
                            self.reports[node] = {**self.reports.get(node, {}), "state": LOST}
                    else:
                        try:
                            report = loads(value)
                        except (ValueError, UnicodeDecodeError):
                            report = {"state": FAILED, "error": "its report is not JSON"}
                        if report.get("state") not in (*STATES, FAILED):
                            report = {"state": FAILED, "error": f"unknown state {str(report.get('state'))[:40]!r}"}
                        # what an earlier report said (its freeze instant) stays
                        self.reports[node] = {**self.reports.get(node, {}), **report}
            self._cond.notify_all()

    # -- the cluster manifest ------------------------------------------------------

    def _record_nodes(self, manifest: dict[str, Any]) -> None:
        with self._cond:
            reports = {n: dict(self.reports.get(n) or {"state": "silent"}) for n in self.file.nodes}
        manifest["nodes"] = reports
        instants = [r["frozen_at"] for r in reports.values() if isinstance(r.get("frozen_at"), int | float)]
        manifest["skew_ms"] = round((max(instants) - min(instants)) * 1000, 3) if len(instants) > 1 else None

    def _write(self, manifest: dict[str, Any], *, local: bool = True) -> None:
        """Into etcd (``result``) and, ``local`` (a checkpoint's, not a restore's), into
        the state directory."""
        text = json.dumps(manifest, indent=2) + "\n"
        if local:
            from snapcore.host.fsutil import secure_dir
            from snapcore.host.tools import write_atomic

            try:
                path = cluster_manifest_path(self.state_dir, self.checkpoint_id)
                secure_dir(self.state_dir)
                secure_dir(path.parent.parent)
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                write_atomic(path, text.encode(), mode=0o600)
            except (OSError, SnapcoreError) as exc:
                log.error("cannot write the cluster manifest under %s: %s", self.state_dir, exc)
        try:
            self.etcd.put(self.keys.result(self.checkpoint_id), text.encode())
        except EtcdUnavailable as exc:
            log.warning("cannot put the cluster manifest into etcd: %s", exc)
