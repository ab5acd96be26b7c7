"""The Python API: every command of ``snapcore`` as a typed call (the command line
parses, calls these, and prints). For checkpoint/restart tools: :func:`checkpoint` (one
call) or :func:`hold` (a ``with`` block); for admins' tools: :func:`restore`,
:func:`verify`, :func:`list_checkpoints`, :func:`show`, :func:`prune`, :func:`delete`,
:func:`recover`, :func:`check_policy`, :func:`plan`.

Each call takes ``state_dir`` (default: ``SNAPCORE_STATE_DIR``, the policy's
``state_dir``, ``/var/lib/snapcore``), ``run_dir`` (journal and locks; default
``SNAPCORE_RUN_DIR`` or ``/run/snapcore``) and ``plugins`` (default: every installed
backend, see :func:`snapcore.make_plugins`) where it needs them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore.errors import PolicyError, PolicyProblems, UsageError
from snapcore.host.locks import default_run_dir
from snapcore.plugins import Plugins, default_plugins
from snapcore.policy import Policy, check_backends, load_policy, resolved_options, state_dir_of
from snapcore.safety.cancel import Cancel
from snapcore.safety.deadline import Watchdog
from snapcore.store.manifest import Manifest
from snapcore.transaction import Payload, Selection, TaskSpec, Transaction, check_payload
from snapcore.transaction import plan as _plan
from snapcore.transaction.handoff import check_request

if TYPE_CHECKING:  # loaded by the calls that need them (the command line starts faster)
    from snapcore.store.restore import MountRestored, Verification
    from snapcore.store.retention import Deletion, PruneReport
    from snapcore.transaction.core import Barrier

PathLike = str | os.PathLike[str]


def _state(state_dir: PathLike | None, policy: Policy | None = None) -> Path:
    return state_dir_of(policy or Policy.default(), os.fspath(state_dir) if state_dir else None)


def _run(run_dir: PathLike | None) -> Path:
    return Path(run_dir) if run_dir else default_run_dir()


def _policy(policy: Policy | PathLike | None) -> Policy:
    if policy is None:
        return Policy.default()
    if isinstance(policy, Policy):
        return policy
    return load_policy(policy)


def _transaction(
    paths: Sequence[PathLike],
    policy: Policy | PathLike | None,
    checkpoint_id: str | None,
    state_dir: PathLike | None,
    plugins: Plugins | None,
    watchdog: Watchdog | None,
    run_dir: PathLike | None = None,
    cancel: Cancel | None = None,
    tasks: TaskSpec | None = None,
    send_images: bool = False,
    hand_off: float | None = None,
    barrier: Barrier | None = None,
) -> Transaction:
    pol = _policy(policy)
    return Transaction(
        plugins or default_plugins(),
        pol,
        paths,
        state_dir=_state(state_dir, pol),
        run_dir=Path(run_dir) if run_dir else None,
        checkpoint_id=checkpoint_id,
        watchdog=watchdog,
        cancel=cancel,
        tasks=tasks,
        send_images=send_images,
        hand_off=hand_off,
        barrier=barrier,
    )


def _tasks(pid: int | None, cgroup: PathLike | None, tasks: TaskSpec | None) -> TaskSpec | None:
    given = [x for x in (pid, cgroup, tasks) if x is not None]
    if len(given) > 1:
        raise UsageError("name the tasks once: pid, cgroup or tasks")
    if pid is not None:
        return TaskSpec(pid=pid)
    if cgroup is not None:
        return TaskSpec(cgroup=os.fspath(cgroup))
    return tasks


def checkpoint(
    paths: Sequence[PathLike] = (),
    *,
    policy: Policy | PathLike | None = None,
    checkpoint_id: str | None = None,
    state_dir: PathLike | None = None,
    payload: Payload | None = None,
    plugins: Plugins | None = None,
    watchdog: Watchdog | None = None,
    run_dir: PathLike | None = None,
    cancel: Cancel | None = None,
    pid: int | None = None,
    cgroup: PathLike | None = None,
    tasks: TaskSpec | None = None,
    send_images: bool = False,
    hand_off: float | None = None,
    barrier: Barrier | None = None,
) -> Manifest:
    """Checkpoint the mounts holding ``paths`` (and/or the policy's mounts).

    ``pid`` (a process and its descendants) or ``cgroup`` (every process of it) name
    tasks to freeze too, as ``--pid``/``--cgroup`` do: the mounts their open files,
    mappings and working directories use are added, their inventory is recorded, and
    files they need that change before they are thawed fail the checkpoint (the
    policy's ``on_change``). ``tasks`` is the general form (:class:`TaskSpec`: e.g.
    tasks CRIU already holds stopped).

    ``payload`` (a command line, or a callable given the
    :class:`~snapcore.types.Checkpoint`) runs once every target has its image; a
    non-zero status fails the checkpoint. Returns the manifest, which is also
    written to ``STATE/checkpoints/ID/manifest.json``; raises
    :class:`~snapcore.errors.CheckpointFailed` (carrying the failed manifest) on
    failure, with every target thawed and partial images discarded.

    ``cancel``: a :class:`~snapcore.safety.cancel.Cancel` another thread (or a signal
    handler) may set; the checkpoint then fails at its next step, its exporters'
    commands stopped at once.

    ``send_images``: the payload is a ``criu dump``; its image directory is copied
    into each export directory as ``criu/``, so that the export alone restarts the
    program elsewhere. ``hand_off`` (seconds; implies ``send_images``): the dump
    leaves the tasks frozen here, and once the checkpoint is complete they are held
    until the destination's ``restore --from`` answers: restored → they are ended
    here; failed, or no answer in time → thawed, the program goes on here. The
    manifest's ``handoff`` says which.

    ``barrier``: called at the sequence's meeting points with their name and the
    transaction (``ready``, ``imaged``, ``dumped``: :attr:`Transaction.barrier`); a
    cluster checkpoint's agent waits there for the other nodes.
    """
    check_payload(payload)
    spec = _tasks(pid, cgroup, tasks)
    check_request(send_images, hand_off, payload, spec)
    txn = _transaction(
        paths,
        policy,
        checkpoint_id,
        state_dir,
        plugins,
        watchdog,
        run_dir,
        cancel,
        spec,
        send_images,
        hand_off,
        barrier,
    )
    return txn.run(payload)


def rehearse(
    paths: Sequence[PathLike] = (),
    *,
    policy: Policy | PathLike | None = None,
    state_dir: PathLike | None = None,
    plugins: Plugins | None = None,
    run_dir: PathLike | None = None,
    tasks: TaskSpec | None = None,
) -> list[str]:
    """What :func:`checkpoint` with these arguments would checkpoint now (the mount
    points), changing nothing: it raises what the checkpoint would raise before
    freezing anything (:class:`~snapcore.errors.PolicyProblems`,
    :class:`~snapcore.errors.UnsupportedMount`, a :class:`~snapcore.errors.UsageError`),
    and loads what it will need. For a checkpoint that starts later, at a moment
    someone else chooses (a runtime's CRIU at post-dump)."""
    txn = _transaction(paths, policy, None, state_dir, plugins, None, run_dir, None, tasks)
    return txn.rehearse()


@contextmanager
def hold(
    paths: Sequence[PathLike] = (),
    *,
    policy: Policy | PathLike | None = None,
    checkpoint_id: str | None = None,
    state_dir: PathLike | None = None,
    plugins: Plugins | None = None,
    watchdog: Watchdog | None = None,
    run_dir: PathLike | None = None,
    cancel: Cancel | None = None,
    pid: int | None = None,
    cgroup: PathLike | None = None,
) -> Iterator[Transaction]:
    """Hold the targets imaged and frozen for the body of a ``with`` block.

    The body runs inside the freeze window: keep it short, and never write to a
    frozen target from it. On any exit everything is thawed; the deadline
    (``freeze_timeout``) thaws it even if the body hangs.
    """
    spec = _tasks(pid, cgroup, None)
    txn = _transaction(paths, policy, checkpoint_id, state_dir, plugins, watchdog, run_dir, cancel, spec)
    with txn.hold() as held:
        yield held


def plan(
    paths: Sequence[PathLike] = (),
    *,
    policy: Policy | PathLike | None = None,
    plugins: Plugins | None = None,
) -> list[Selection]:
    """Per mount, the imager and exporter a checkpoint would use, and why. Touches nothing."""
    selections, _ = _plan(plugins or default_plugins(), _policy(policy), paths)
    return selections


def restore(
    checkpoint_id: str | None = None,
    *,
    from_dir: PathLike | None = None,
    to: PathLike | None = None,
    in_place: bool = False,
    mount: str | None = None,
    safe: bool = False,
    before_criu_restore: bool = False,
    state_dir: PathLike | None = None,
    plugins: Plugins | None = None,
    on_restored: Callable[[MountRestored], None] | None = None,
) -> list[MountRestored]:
    """Bring a checkpoint's images back: ``to`` a new directory, or ``in_place`` (the
    mount rolled back; refused while a process holds it). ``from_dir`` restores from
    an export directory alone, on a host that never saw the checkpoint (its manifest
    copy and records are checked as untrusted input). ``mount`` restores that mount
    only; ``safe`` (with ``to``) leaves out device nodes, FIFOs and sockets and clears
    setuid/setgid bits and file capabilities. ``before_criu_restore`` first checks that
    the checkpointed tasks' PIDs are free (``criu restore`` needs them).

    Returns each mount restored (and, in place, the checkpoint id of the state it
    replaced); ``on_restored`` hears of each as it is done. Raises
    :class:`~snapcore.errors.SnapcoreError` naming the mounts already restored."""
    from snapcore.store.restore import restore as _restore

    return _restore(
        plugins or default_plugins(),
        _state(state_dir),
        checkpoint_id=checkpoint_id,
        from_dir=Path(from_dir) if from_dir is not None else None,
        mount=mount,
        to=Path(to) if to is not None else None,
        in_place=in_place,
        safe=safe,
        before_criu_restore=before_criu_restore,
        on_restored=on_restored,
    )


def verify(
    checkpoint_id: str | None = None,
    *,
    from_dir: PathLike | None = None,
    state_dir: PathLike | None = None,
    plugins: Plugins | None = None,
) -> Verification:
    """Whether a checkpoint's images and exports (or, with ``from_dir``, an export
    directory's) are still there and intact: ``.ok``, and per mount what is wrong."""
    from snapcore.store.restore import verify as _verify

    return _verify(
        plugins or default_plugins(),
        _state(state_dir),
        checkpoint_id=checkpoint_id,
        from_dir=Path(from_dir) if from_dir is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Listed:
    """One checkpoint in the state directory (:func:`list_checkpoints`)."""

    id: str
    path: Path
    #: None when the manifest cannot be read (then ``error`` says why).
    manifest: Manifest | None
    error: str | None = None


def list_checkpoints(*, state_dir: PathLike | None = None) -> list[Listed]:
    """Every checkpoint's manifest, newest first (an unreadable one is listed with why)."""
    from snapcore.store.manifest import iter_manifests

    return [
        Listed(manifest.id if manifest else path.parent.name, path, manifest, error)
        for path, manifest, error in iter_manifests(_state(state_dir))
    ]


def show(checkpoint_id: str, *, state_dir: PathLike | None = None) -> Manifest:
    """One checkpoint's manifest."""
    from snapcore.store.manifest import load

    return load(_state(state_dir), checkpoint_id)


def prune(
    *,
    dry_run: bool = False,
    now: float | None = None,
    state_dir: PathLike | None = None,
    run_dir: PathLike | None = None,
    plugins: Plugins | None = None,
) -> PruneReport:
    """Apply each mount's ``keep`` rule: remove old images and exports through their
    backends (with ``dry_run``, only say what would go). ``now`` (seconds since the
    epoch) is the time ``within`` counts back from. Errors are in the report."""
    from snapcore.store.retention import prune as _prune

    return _prune(_state(state_dir), plugins or default_plugins(), dry_run=dry_run, now=now, run_dir=_run(run_dir))


def delete(
    checkpoint_ids: Sequence[str],
    *,
    mounts: Sequence[str] = (),
    dry_run: bool = False,
    state_dir: PathLike | None = None,
    run_dir: PathLike | None = None,
    plugins: Plugins | None = None,
) -> list[Deletion]:
    """Remove checkpoints (or only ``mounts``' part of them): each export, then each
    image, through their backends, which refuse what snapcore did not make and what
    later increments build on; then the manifest, once nothing of it is left."""
    from snapcore.store.retention import delete as _delete

    return _delete(
        _state(state_dir),
        plugins or default_plugins(),
        checkpoint_ids,
        mounts=[os.path.normpath(m) for m in mounts],
        dry_run=dry_run,
        run_dir=_run(run_dir),
    )


@dataclass(frozen=True, slots=True)
class Recovered:
    """A checkpoint whose controller died, and what :func:`recover` did about it."""

    checkpoint_id: str
    done: list[str]
    #: It was complete when its controller died (e.g. during a hand-off): kept as it
    #: is, not marked failed.
    complete: bool = False


def recover(*, run_dir: PathLike | None = None, plugins: Plugins | None = None) -> list[Recovered]:
    """Thaw and clean up after controllers that died, from their journals (a journal
    whose controller is alive is left alone)."""
    from snapcore.safety.journal import recover as _recover

    return [
        Recovered(cid, done, complete) for cid, done, complete in _recover(_run(run_dir), plugins or default_plugins())
    ]


def check_policy(path: PathLike, *, plugins: Plugins | None = None) -> list[PolicyError]:
    """Every problem of the policy file at ``path`` (empty: it is good), each naming the
    file, line, mount and key; the backends' options are checked against ``plugins``."""
    try:
        policy = load_policy(path)
    except PolicyProblems as exc:
        return list(exc.problems)
    return check_backends(policy, plugins or default_plugins())


def backend_options(
    policy: Policy | PathLike, mount: str, backend: str, *, plugins: Plugins | None = None
) -> Mapping[str, Any]:
    """The options ``backend`` gets for ``mount`` under ``policy`` (its rule's own,
    over the policy's defaults, over the backend's): what its hooks see as
    ``target.options[backend]``."""
    pol = _policy(policy)
    rule = pol.rule_for(os.path.normpath(mount))
    if rule is None:
        raise UsageError(f"{pol.path or 'the policy'} has no rule for {mount}")
    return resolved_options(pol, rule, [backend], plugins or default_plugins())[backend]


__all__ = [
    "Listed",
    "Recovered",
    "TaskSpec",
    "backend_options",
    "check_policy",
    "checkpoint",
    "delete",
    "hold",
    "list_checkpoints",
    "plan",
    "prune",
    "recover",
    "restore",
    "show",
    "verify",
]
