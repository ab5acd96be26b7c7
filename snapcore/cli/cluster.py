"""``snapcore agent`` and ``snapcore checkpoint --cluster FILE``: a checkpoint across
nodes, coordinated on etcd (:mod:`snapcore.cluster`). Both load the etcd client
(gRPC, ~80 ms); no other command does."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from snapcore.cli.common import duration_arg, plugins_of, print_json, require_root, run_dir_arg, state_dir_arg
from snapcore.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from snapcore.cluster.protocol import ClusterFile


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--etcd", required=True, metavar="URL", help="this node's etcd member, http://HOST:PORT")
    p.add_argument("--node", required=True, metavar="NAME", help="the name this node is known by in requests")
    p.add_argument("--prefix", default="/snapcore", metavar="KEY", help="the keys' prefix in etcd (default /snapcore)")
    p.add_argument(
        "--lease",
        type=duration_arg,
        default=2.0,
        metavar="TIME",
        help="the agent's etcd lease (default 2s): a dead or cut-off agent aborts the others this long after",
    )
    p.add_argument("--policy", metavar="F", help="the policy of a request that names none")


def cmd_agent(args: argparse.Namespace) -> int:
    from snapcore.cluster.agent import Agent
    from snapcore.cluster.etcd import Etcd
    from snapcore.cluster.protocol import NODE_NAME, Endpoint, keys
    from snapcore.safety.cancel import Cancel, on_signals

    require_root("snapcore agent")
    if not NODE_NAME.fullmatch(args.node):
        raise UsageError(f"--node {args.node!r}: letters, digits, '.', '_', '-' (at most 63)")
    if args.policy:  # a bad default policy is said now, not at the first request
        from snapcore.policy import load_policy

        load_policy(args.policy)
    etcd = Etcd(Endpoint.parse(args.etcd))
    cancel = Cancel()
    stop = threading.Event()
    agent = Agent(
        etcd,
        keys(args.prefix),
        args.node,
        lease_ttl=args.lease,
        policy=args.policy,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        run_dir=run_dir_arg(args),
        plugins=plugins_of(args),
        cancel=cancel,
    )
    try:
        with on_signals(cancel):  # SIGTERM: the checkpoint under way fails (thawed), then the agent leaves
            threading.Thread(target=_stop_on, args=(cancel, stop), daemon=True).start()
            agent.serve(stop)
    finally:
        etcd.close()
    return ExitCode.OK


def _stop_on(cancel: object, stop: threading.Event) -> None:
    cancel.wait()  # type: ignore[attr-defined]
    stop.set()


def check_cluster_args(args: argparse.Namespace, command: list[str] | None) -> None:
    """``--cluster`` names everything in its file: the other ways of naming what to
    checkpoint are refused (exit 2), not silently ignored."""
    given = [
        opt
        for opt, value in (
            ("PATH", args.paths),
            ("--policy", args.policy),
            ("--pid", args.pid),
            ("--cgroup", args.cgroup),
            ("--container", args.container),
            ("--send-images", args.send_images),
            ("--hand-off", args.hand_off),
            ("-- CMD", command),
        )
        if value
    ]
    if given:
        raise UsageError(
            f"--cluster FILE names each node's policy, tasks and payload in FILE: not with {', '.join(given)}"
        )


def cmd_checkpoint_cluster(args: argparse.Namespace, command: list[str] | None) -> int:
    from snapcore.cluster.protocol import load_cluster_file
    from snapcore.store.manifest import check_checkpoint_id, new_checkpoint_id

    check_cluster_args(args, command)
    file = load_cluster_file(args.cluster)
    checkpoint_id = check_checkpoint_id(args.checkpoint_id) if args.checkpoint_id else new_checkpoint_id()
    return _coordinate(args, file, checkpoint_id, as_json=args.json)


def _coordinate(args: argparse.Namespace, file: ClusterFile, checkpoint_id: str, *, as_json: bool) -> int:
    """Run the coordinator of ``file`` (a checkpoint's, or a restore's: its keys under
    the checkpoint's), print its manifest, however it ended."""
    from snapcore.cluster.coordinator import ClusterFailed, Coordinator
    from snapcore.cluster.etcd import Etcd
    from snapcore.cluster.protocol import RESTORE_OP, Endpoint, keys
    from snapcore.safety.cancel import Cancel, on_signals

    space = keys(file.prefix).for_op(RESTORE_OP if file.kind == "restore" else "")
    etcd = Etcd(Endpoint.parse(file.endpoint))
    cancel = Cancel()
    coordinator = Coordinator(etcd, space, file, checkpoint_id, state_dir_arg(args), cancel=cancel)
    try:
        with on_signals(cancel):
            manifest = coordinator.run()
    except ClusterFailed as exc:
        _show(exc.manifest, as_json)
        raise
    finally:
        etcd.close()
    _show(manifest, as_json)
    return ExitCode.OK


def _show(manifest: dict[str, object], as_json: bool) -> None:
    if as_json:
        print_json(manifest)
        return
    from snapcore.cluster.record import summary

    sys.stdout.write(summary(manifest) + "\n")
    sys.stdout.flush()


def cmd_restore_cluster(args: argparse.Namespace, command: list[str] | None) -> int:
    """``snapcore restore ID --cluster FILE``: every node's agent restores its part."""
    from snapcore.cluster.protocol import load_cluster_file
    from snapcore.store.manifest import check_checkpoint_id

    given = [o for o, v in (("--from", args.from_dir), ("--mount", args.mount), ("--wait", args.wait)) if v]
    given += [o for o, v in (("--safe", args.safe), ("--no-check", args.no_check), ("-- CMD", command)) if v]
    if given:
        raise UsageError(f"--cluster FILE names each node's restore and command in FILE: not with {', '.join(given)}")
    if not args.checkpoint_id:
        raise UsageError("restore --cluster FILE needs the cluster checkpoint's ID")
    check_checkpoint_id(args.checkpoint_id)
    file = load_cluster_file(args.cluster, kind="restore")
    return _coordinate(args, file, args.checkpoint_id, as_json=False)
