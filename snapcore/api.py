"""The Python API for checkpoint/restart tools: one call, or a ``with`` block."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from snapcore.cancel import Cancel
from snapcore.manifest import Manifest
from snapcore.plugins import Plugins, default_plugins
from snapcore.policy import Policy, load_policy, state_dir_of
from snapcore.transaction import Payload, Selection, Transaction, check_payload
from snapcore.transaction import plan as _plan
from snapcore.watchdog import Watchdog

PathLike = str | os.PathLike[str]


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
) -> Transaction:
    pol = _policy(policy)
    return Transaction(
        plugins or default_plugins(),
        pol,
        paths,
        state_dir=state_dir_of(pol, os.fspath(state_dir) if state_dir else None),
        run_dir=Path(run_dir) if run_dir else None,
        checkpoint_id=checkpoint_id,
        watchdog=watchdog,
        cancel=cancel,
    )


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
) -> Manifest:
    """Checkpoint the mounts holding ``paths`` (and/or the policy's mounts).

    ``payload`` (a command line, or a callable given the
    :class:`~snapcore.types.Checkpoint`) runs once every target has its image; a
    non-zero status fails the checkpoint. Returns the manifest, which is also
    written to ``STATE/checkpoints/ID/manifest.json``; raises
    :class:`~snapcore.errors.CheckpointFailed` (carrying the failed manifest) on
    failure, with every target thawed and partial images discarded.

    ``cancel``: a :class:`~snapcore.cancel.Cancel` another thread (or a signal
    handler) may set; the checkpoint then fails at its next step, its exporters'
    commands stopped at once.
    """
    check_payload(payload)
    txn = _transaction(paths, policy, checkpoint_id, state_dir, plugins, watchdog, run_dir, cancel)
    return txn.run(payload)


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
) -> Iterator[Transaction]:
    """Hold the targets imaged and frozen for the body of a ``with`` block.

    The body runs inside the freeze window: keep it short, and never write to a
    frozen target from it. On any exit everything is thawed; the deadline
    (``freeze_timeout``) thaws it even if the body hangs.
    """
    txn = _transaction(paths, policy, checkpoint_id, state_dir, plugins, watchdog, run_dir, cancel)
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


__all__ = ["checkpoint", "hold", "plan"]
