"""The ``snapcore`` commands: each one's arguments and what it does, through the
Python API (:mod:`snapcore.api`): parse, call, print. Heavy modules load per command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from snapcore.cli import files_check
from snapcore.cli.common import (
    RESTORED_ENV,
    duration_arg,
    plugins_of,
    policy_of,
    print_json,
    require_root,
    run_dir_arg,
    said,
    state_dir_arg,
)
from snapcore.cli.criu_hook import cmd_criu_hook
from snapcore.cli.parser import Parser
from snapcore.errors import CheckpointFailed, ExitCode, SnapcoreError, UsageError
from snapcore.log import get_logger

log = get_logger("snapcore")


# -- arguments -----------------------------------------------------------------------


def _add_backends(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def _add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="F")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--json", action="store_true")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="F")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--id", dest="checkpoint_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print the manifest")
    tasks = p.add_mutually_exclusive_group()
    tasks.add_argument("--pid", type=int, metavar="PID", help="freeze this process and its descendants too")
    tasks.add_argument("--cgroup", metavar="PATH", help="freeze every process of this cgroup too")
    tasks.add_argument(
        "--container",
        metavar="RUNTIME:ID",
        help="checkpoint this container with its runtime (runc, podman): the command after '--' is the "
        "runtime's own checkpoint command (default: RUNTIME checkpoint ID); its files are made consistent at "
        "CRIU's post-dump",
    )
    p.add_argument(
        "--cluster",
        metavar="FILE",
        help="coordinate a checkpoint of several nodes on etcd: FILE names etcd and, per node, its policy, "
        "tasks and payload; each node's 'snapcore agent' does its part; one id for all",
    )
    p.add_argument(
        "--send-images",
        action="store_true",
        help="with '-- criu dump ... -D DIR' or --container: copy CRIU's images into each export directory (as "
        "criu/), so that the export alone restarts the program on another host",
    )
    p.add_argument(
        "--hand-off",
        type=duration_arg,
        metavar="TIME",
        help="move the program (--pid/--cgroup with '-- criu dump ...', or --container; implies --send-images): "
        "keep the tasks stopped here until the destination's 'restore --from' answers, at most TIME (30s, 2m): "
        "restored → they are ended here; else they go on here (exit 1)",
    )


def _add_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="the cluster manifest (checkpoint --cluster, kept where the coordinator ran), not this node's",
    )


def _add_restore(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint_id", metavar="ID", nargs="?")
    p.add_argument(
        "--from", dest="from_dir", metavar="EXPORT_DIR", help="restore from an export directory alone (instead of ID)"
    )
    p.add_argument("--mount", metavar="M", help="only this mount point")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--to", metavar="DIR", help="restore into DIR (a new place)")
    where.add_argument("--in-place", action="store_true", help="roll the mount back in place")
    where.add_argument(
        "--cluster",
        metavar="FILE",
        help="restore every node's part of a cluster checkpoint through the nodes' agents: FILE names etcd "
        "and, per node, where to restore and the command to run once every node has its files back",
    )
    p.add_argument(
        "--safe",
        action="store_true",
        help="with --to: leave out device nodes, FIFOs and sockets, clear setuid/setgid bits and file "
        "capabilities (for an export you do not trust)",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="with '-- CMD': run CMD without first checking that the files the tasks need are theirs",
    )
    p.add_argument(
        "--wait",
        type=duration_arg,
        metavar="TIME",
        help="with --from: wait up to TIME (30s, 2m) for the export to be complete (its manifest copy arrives last)",
    )


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint_id", metavar="ID", nargs="?")
    p.add_argument("--from", dest="from_dir", metavar="EXPORT_DIR", help="verify an export directory (instead of ID)")


def _add_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def _add_delete(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint_ids", nargs="+", metavar="ID")
    p.add_argument("--mount", action="append", default=[], metavar="M", help="only this mount's image (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")


def _add_nothing(p: argparse.ArgumentParser) -> None:
    return None


def _add_criu_hook(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", metavar="F")
    p.add_argument(
        "--write-script",
        metavar="FILE",
        help="write a CRIU action script that runs this hook (with these options) for post-dump and pre-restore "
        "only, then exit",
    )
    p.add_argument("paths", nargs="*", metavar="PATH")


def _add_policy(p: argparse.ArgumentParser) -> None:
    policy_sub = p.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=Parser)
    policy_sub.required = True
    c = policy_sub.add_parser("check", help="validate a policy, print problems")
    c.add_argument("file", metavar="F")
    policy_sub.add_parser(
        "schema",
        help="print the policy's JSON Schema, with the installed backends' options (for editors: yaml-language-server)",
    )


# -- helpers ---------------------------------------------------------------------------


def _run_after_restore(command: list[str], checkpoint_id: str | None) -> int:
    """``snapcore restore ID -- criu restore -D DIR``: the files first, then CMD."""
    import shutil
    import subprocess

    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]}")
    env = dict(os.environ)
    if checkpoint_id:
        env[RESTORED_ENV] = checkpoint_id
    status = subprocess.run(command, check=False, env=env).returncode
    if status != 0:
        from snapcore.tasks.criu import describe_failure

        raise SnapcoreError(describe_failure(command, status))
    return ExitCode.OK


def cmd_recover(args: argparse.Namespace) -> int:
    from snapcore import api

    require_root("snapcore recover")
    report = api.recover(run_dir=run_dir_arg(args), plugins=plugins_of(args))
    if not report:
        print("nothing to recover")
    for recovered in report:
        said = "complete, kept" if recovered.complete else "marked failed"
        print(f"checkpoint {recovered.checkpoint_id}: {said}")
        for line in recovered.done:
            print(f"  {line}")
    return ExitCode.OK


# -- commands ------------------------------------------------------------------------


def cmd_backends(args: argparse.Namespace) -> int:
    plugins = plugins_of(args)
    rows = [
        {
            "name": name,
            "roles": sorted(r.value for r in b.info.roles),
            "distribution": b.distribution,
            "version": b.version,
            "description": b.info.description,
        }
        for name, b in sorted(plugins.backends.items())
    ]
    broken = [{"name": b.name, "distribution": b.distribution, "error": b.error} for b in plugins.broken]
    if args.json:
        print_json({"backends": rows, "broken": broken})
        return ExitCode.OK
    for row in rows:
        print(
            f"{row['name']:<12} {','.join(row['roles']):<16} {row['distribution']} {row['version']}".rstrip()
            + f"\n             {row['description']}"
        )
    for b in broken:
        print(f"{b['name']:<12} BROKEN           {b['distribution']}: {b['error']}")
    return ExitCode.OK


def cmd_plan(args: argparse.Namespace) -> int:
    from snapcore.transaction import plan

    plugins = plugins_of(args)
    policy = policy_of(args)
    selections, warnings = plan(plugins, policy, args.paths)  # api.plan, with the warnings
    if args.json:
        print_json(
            {
                "policy": policy.path,
                "warnings": warnings,
                "mounts": [
                    {
                        "mount": s.mount.mount_point,
                        "fstype": s.mount.fstype,
                        "source": s.mount.source,
                        "device": s.mount.devnode,
                        "rule": s.rule.mount,
                        "imager": s.imager,
                        "exporter": s.exporter,
                        "required": s.rule.required,
                        "why": s.why(),
                        "error": s.error,
                        "answers": {
                            n: (None if a is None else {"ok": a.ok, "score": a.score, "reason": a.reason})
                            for n, a in s.answers.items()
                        },
                    }
                    for s in selections
                ],
            }
        )
        return ExitCode.OK
    for s in selections:
        m = s.mount
        device = f", {m.devnode}" if m.devnode else ""
        print(f"{m.mount_point} ({m.fstype}{device}; rule {s.rule.mount})")
        if s.imager:
            print(f"  imager:   {s.imager} — {s.why()}")
        else:
            print(f"  imager:   NONE — {s.error}" + ("" if s.rule.required else " (not required: skipped)"))
        print(f"  exporter: {s.exporter or '-'}")
        for name, answer in sorted(s.answers.items()):
            if name == s.imager:
                continue
            if answer is None:
                print(f"    {name}: no answer")
            else:
                print(f"    {name}: {'yes' if answer.ok else 'no'} ({answer.score}) — {answer.reason}")
    for w in warnings:
        print(f"warning: {w}")
    return ExitCode.OK


def cmd_checkpoint(args: argparse.Namespace, command: list[str] | None) -> int:
    from snapcore import api
    from snapcore.safety.cancel import Cancel, on_signals

    if args.cluster:  # the coordinator freezes nothing itself: the agents do, as root
        from snapcore.cli.cluster import cmd_checkpoint_cluster

        return cmd_checkpoint_cluster(args, command)
    require_root("snapcore checkpoint")
    if args.container:
        from snapcore.cli.container import cmd_checkpoint_container

        return cmd_checkpoint_container(args, command)
    plugins = plugins_of(args)
    policy = policy_of(args)
    if not args.paths and policy.path is None and args.pid is None and not args.cgroup:
        raise UsageError("nothing to checkpoint: give PATHs, --pid, --cgroup, or a --policy that names mounts")
    cancel = Cancel()
    try:
        with on_signals(cancel):  # SIGTERM, Ctrl-C: cancel, thaw, undo, exit 1
            manifest = api.checkpoint(
                args.paths,
                policy=policy,
                checkpoint_id=args.checkpoint_id,
                state_dir=state_dir_arg(args, policy),
                run_dir=run_dir_arg(args),
                payload=command,
                plugins=plugins,
                cancel=cancel,
                pid=args.pid,
                cgroup=args.cgroup or None,
                send_images=args.send_images,
                hand_off=args.hand_off,
            )
    except CheckpointFailed as exc:
        if exc.manifest is not None:
            # the error itself follows once, on stderr ("snapcore: error: ...")
            show_manifest(exc.manifest, args.json, sys.stdout, with_error=False)
        raise
    show_manifest(manifest, args.json, sys.stdout)
    if cancel.is_set():
        print(f"snapcore: {cancel.reason} too late to cancel: checkpoint {manifest.id} is complete", file=sys.stderr)
    if manifest.handoff and manifest.handoff.get("state") != "moved":
        answer = manifest.handoff.get("answer") or {}
        raise SnapcoreError(
            f"checkpoint {manifest.id} is complete, but the program was not moved: "
            f"{answer.get('reason') or 'no answer'}; it runs on here"
        )
    return ExitCode.OK


def show_manifest(manifest: Any, as_json: bool, out: Any, *, with_error: bool = True) -> None:
    if as_json:
        out.write(manifest.dumps())
    else:
        out.write(manifest.summary(with_error=with_error) + "\n")
    out.flush()


def cmd_list(args: argparse.Namespace) -> int:
    from snapcore import api

    rows: list[dict[str, Any]] = []
    for listed in api.list_checkpoints(state_dir=state_dir_arg(args)):
        manifest, path = listed.manifest, listed.path
        if manifest is None:
            rows.append({"id": listed.id, "outcome": "unreadable", "error": listed.error, "path": str(path)})
            continue
        rows.append(
            {
                "id": manifest.id,
                "outcome": manifest.outcome,
                "started": manifest.started,
                "finished": manifest.finished,
                "freeze_window_ms": manifest.freeze_window_ms,
                "mounts": [t.mount for t in manifest.targets],
                "error": manifest.error,
                "path": str(path),
                **({"cluster": manifest.cluster} if manifest.cluster else {}),
            }
        )
    rows = _with_clusters(rows, state_dir_arg(args))
    if args.json:
        print_json(rows)
        return ExitCode.OK
    for row in rows:
        what = " ".join(row.get("mounts") or [])
        if row.get("kind") == "cluster":
            skew = row.get("skew_ms")
            what = "cluster of " + " ".join(row["nodes"]) + (f" (skew {skew:.1f} ms)" if skew is not None else "")
        elif isinstance(row.get("cluster"), dict):
            what += f" [node {row['cluster'].get('node')} of a cluster checkpoint, {row['cluster'].get('state')}]"
        print(f"{row['id']:<28} {row['outcome']:<10} {row.get('started') or '-':<25} {what}")
        if row.get("error"):
            print(f"    {row['error']}")
    return ExitCode.OK


def _with_clusters(rows: list[dict[str, Any]], state_dir: Any) -> list[dict[str, Any]]:
    """``rows`` and a row for each cluster manifest the state directory holds (the
    coordinator's), newest first."""
    from snapcore.cluster.record import iter_cluster_manifests

    clusters: list[dict[str, Any]] = []
    for path, manifest, error in iter_cluster_manifests(state_dir):
        if manifest is None:
            clusters.append({"id": path.parent.name, "kind": "cluster", "outcome": "unreadable", "error": error})
            continue
        clusters.append(
            {
                "id": manifest["id"],
                "kind": "cluster",
                "outcome": str(manifest.get("outcome")),
                "started": manifest.get("started"),
                "finished": manifest.get("finished"),
                "nodes": sorted(str(n) for n in manifest["nodes"]),
                "skew_ms": manifest.get("skew_ms") if isinstance(manifest.get("skew_ms"), int | float) else None,
                "error": manifest.get("error"),
                "path": str(path),
            }
        )
    if not clusters:
        return rows
    return sorted(rows + clusters, key=lambda r: str(r.get("started") or ""), reverse=True)


def cmd_show(args: argparse.Namespace) -> int:
    from snapcore import api
    from snapcore.cluster.record import cluster_manifest_path, read_cluster_manifest, summary
    from snapcore.store.manifest import check_checkpoint_id, manifest_path

    state_dir = state_dir_arg(args)
    check_checkpoint_id(args.checkpoint_id)  # a name, not a path
    cluster_path = cluster_manifest_path(state_dir, args.checkpoint_id)
    cluster = read_cluster_manifest(cluster_path) if cluster_path.is_file() else None
    if args.cluster and cluster is None:
        raise UsageError(f"checkpoint {args.checkpoint_id!r} has no cluster manifest here ({cluster_path})")
    if cluster is not None and (args.cluster or not manifest_path(state_dir, args.checkpoint_id).exists()):
        if args.json:
            print_json(cluster)
        else:
            print(summary(cluster))
        return ExitCode.OK
    show_manifest(api.show(args.checkpoint_id, state_dir=state_dir), args.json, sys.stdout)
    if cluster is not None and not args.json:
        print(summary(cluster))
    return ExitCode.OK


def _which(args: argparse.Namespace) -> None:
    if (args.checkpoint_id is None) == (args.from_dir is None):
        raise UsageError(f"give a checkpoint ID or --from EXPORT_DIR (see 'snapcore {args.command} --help')")


def cmd_restore(args: argparse.Namespace, then: Sequence[str] | None = None) -> int:
    """``snapcore restore``; ``then`` is the command to run after it (``-- CMD``)."""
    from snapcore import api
    from snapcore.cli.arrival import is_criu_restore

    require_root("snapcore restore")
    _which(args)
    if args.safe and not args.to:
        raise UsageError("--safe restores a copy: use it with --to DIR")
    api.restore(
        args.checkpoint_id,
        from_dir=args.from_dir,
        to=args.to,
        in_place=args.in_place,
        mount=args.mount,
        safe=args.safe,
        before_criu_restore=is_criu_restore(then),
        state_dir=state_dir_arg(args),
        plugins=plugins_of(args),
        on_restored=said,
    )
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from snapcore import api

    _which(args)
    found = api.verify(
        args.checkpoint_id, from_dir=args.from_dir, state_dir=state_dir_arg(args), plugins=plugins_of(args)
    )
    for mount, problems in found.mounts.items():
        print(f"{mount}: {'OK' if not problems else 'DAMAGED'}")
    for p in found.problems:
        print(f"  {p}")
    if not found.ok:
        raise SnapcoreError(f"checkpoint {found.checkpoint_id}: {len(found.problems)} problem(s) found")
    return ExitCode.OK


def cmd_prune(args: argparse.Namespace) -> int:
    from snapcore import api
    from snapcore.store.retention import describe

    if not args.dry_run:
        require_root("snapcore prune")
    report = api.prune(
        dry_run=args.dry_run, state_dir=state_dir_arg(args), run_dir=run_dir_arg(args), plugins=plugins_of(args)
    )
    for line in describe(report, args.dry_run):
        print(line)
    if report.errors:
        raise SnapcoreError(f"prune: {len(report.errors)} image(s) could not be removed")
    return ExitCode.OK


def cmd_delete(args: argparse.Namespace) -> int:
    from snapcore import api

    if not args.dry_run:
        require_root("snapcore delete")
    done = api.delete(
        args.checkpoint_ids,
        mounts=args.mount,
        dry_run=args.dry_run,
        state_dir=state_dir_arg(args),
        run_dir=run_dir_arg(args),
        plugins=plugins_of(args),
    )
    verb = "would remove" if args.dry_run else "removed"
    errors = 0
    for deletion in done:
        cid = deletion.manifest.id
        for mount, what in deletion.removed:
            print(f"{cid}: {mount}: {verb} {what}")
        for error in deletion.errors:
            print(f"{cid}: error: {error}")
        if deletion.manifest_removed:
            print(f"{cid}: {verb} its manifest")
        elif not deletion.removed and not deletion.errors:
            print(f"{cid}: nothing of it left to remove")
        errors += len(deletion.errors)
    if errors:
        raise SnapcoreError(f"delete: {errors} image(s) or export(s) could not be removed; their manifests keep them")
    return ExitCode.OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    from snapcore import api
    from snapcore.policy import load_policy

    if args.policy_command == "schema":
        from snapcore.policy.schema import policy_schema

        print_json(policy_schema(plugins_of(args)))
        return ExitCode.OK

    problems = api.check_policy(args.file, plugins=plugins_of(args))
    for problem in problems:
        print(f"snapcore: error: {problem}", file=sys.stderr)
    if problems:
        return ExitCode.USAGE
    policy = load_policy(args.file)
    n = len(policy.rules) + (1 if policy.fallback else 0)
    print(f"{args.file}: OK ({n} rule(s))")
    return ExitCode.OK


def _add_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", metavar="ID1")
    p.add_argument("new", metavar="ID2", nargs="?", help="another checkpoint (default: the live tree)")
    p.add_argument("--mount", metavar="M", help="only this mount point")
    p.add_argument("--json", action="store_true")


def cmd_diff(args: argparse.Namespace) -> int:
    """``snapcore diff ID1 [ID2]``: per mount, what changed (snapper status's letters)."""
    from pathlib import Path

    from snapcore import api
    from snapcore.store.diff import Change, diff_trees, tree_of

    state_dir = state_dir_arg(args)
    old = api.show(args.old, state_dir=state_dir)
    new = api.show(args.new, state_dir=state_dir) if args.new else None
    records = [r for r in old.targets if r.outcome == "ok" and (args.mount is None or r.mount == args.mount)]
    if not records:
        raise UsageError(f"checkpoint {old.id} has no kept image of {args.mount or 'any mount'}")
    results: list[tuple[str, list[Change]]] = []
    for record in records:
        if new is None:
            other: Path = Path(record.mount)
        else:
            match = next((r for r in new.targets if r.mount == record.mount and r.outcome == "ok"), None)
            if match is None:
                raise UsageError(f"checkpoint {new.id} has no kept image of {record.mount}")
            other = tree_of(new, match)
        results.append((record.mount, diff_trees(tree_of(old, record), other)))
    against = new.id if new else "live"
    if args.json:
        rows = [{"mount": m, "old": old.id, "new": against, "changes": [c.to_json() for c in cs]} for m, cs in results]
        print_json(rows)
        return ExitCode.OK
    for mount, changes in results:
        print(f"{mount}: {old.id} -> {against}, {len(changes)} change(s)")
        for change in changes:
            print(f"  {change.what:<7} {change.path}")
    return ExitCode.OK


def _add_agent(p: argparse.ArgumentParser) -> None:
    from snapcore.cli.cluster import add_agent_arguments

    add_agent_arguments(p)


def _agent(args: argparse.Namespace) -> int:
    from snapcore.cli.cluster import cmd_agent

    return cmd_agent(args)


@dataclass(frozen=True, slots=True)
class Command:
    """One ``snapcore`` command: its help, its arguments, and what it does."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    #: ``run(args, command)``: ``command`` is what follows ``--`` (only where ``takes_command``)
    run: Callable[[argparse.Namespace, list[str] | None], int]
    usage: str | None = None
    takes_command: bool = False


def _plain(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace, list[str] | None], int]:
    return lambda args, command: handler(args)


def restore_then(
    args: argparse.Namespace, command: list[str] | None, before_command: Callable[[], None] | None = None
) -> int:
    """``snapcore restore ... [-- CMD]``; ``before_command`` runs once the files are back
    (and checked), before CMD (a cluster restore's agent waits there for the others)."""
    from pathlib import Path

    from snapcore.cli import arrival

    from_dir = Path(args.from_dir) if args.from_dir else None
    if args.wait is not None:
        if from_dir is None:
            raise UsageError("--wait waits for an export: use it with --from EXPORT_DIR")
        arrival.wait_for_export(from_dir, args.wait)
    manifest = arrival.export_manifest(from_dir)
    # the source holds the program frozen until told: told in every case, once
    answer = arrival.answerer(from_dir, manifest) if command else None
    try:
        code = cmd_restore(args, then=command)
        if command and not args.no_check:
            from snapcore.cli.files_check import check_before

            check_before(args, command)
        if before_command is not None:
            before_command()
        if not command:
            return code
        code = _run_after_restore(arrival.with_images(command, from_dir), args.checkpoint_id)
        arrival.resettle_tasks(command, args.checkpoint_id or (manifest.id if manifest else None))
    except BaseException as exc:
        if answer is not None:
            answer(False, f"the restore here failed: {exc}" if str(exc) else "the restore here failed")
        raise
    if answer is not None:
        answer(True, f"{command[0]} ran on {os.uname().nodename}")
    return code


def _restore(args: argparse.Namespace, command: list[str] | None) -> int:
    if args.cluster:
        from snapcore.cli.cluster import cmd_restore_cluster

        return cmd_restore_cluster(args, command)
    if not args.to and not args.in_place:  # as argparse says it of a required group
        raise UsageError("one of the arguments --to --in-place is required (see 'snapcore restore --help')")
    return restore_then(args, command)


#: Every command, in the order ``--help`` lists them: the one registry.
COMMANDS: dict[str, Command] = {
    "backends": Command("installed backends, roles, versions, broken plugins", _add_backends, _plain(cmd_backends)),
    "plan": Command("per mount: chosen imager/exporter and why; touches nothing", _add_plan, _plain(cmd_plan)),
    "checkpoint": Command(
        "freeze, image, (run CMD), thaw, export; write the manifest",
        _add_checkpoint,
        cmd_checkpoint,
        usage="snapcore checkpoint [--policy F] [PATH...] [--id ID] [--json] [--pid P | --cgroup C] "
        "[--send-images] [--hand-off T] [-- CMD ARGS...]\n"
        "       snapcore checkpoint --container RUNTIME:ID [--policy F] [PATH...] [--send-images] [--hand-off T] "
        "[-- RUNTIME ... checkpoint ... ID]\n"
        "       snapcore checkpoint --cluster FILE [--id ID] [--json]",
        takes_command=True,
    ),
    "list": Command("checkpoints, newest first", _add_list, _plain(cmd_list)),
    "show": Command("one manifest", _add_show, _plain(cmd_show)),
    "restore": Command("bring a checkpoint's images back", _add_restore, _restore, takes_command=True),
    "verify": Command("images and exports still there and intact", _add_verify, _plain(cmd_verify)),
    "diff": Command(
        "what changed between two checkpoints, or one and the live tree (snapper status's letters)",
        _add_diff,
        _plain(cmd_diff),
    ),
    "check-files": Command(
        "the files the checkpointed tasks need are there as they had them (size, mtime, sha256, ghosts)",
        files_check.add_arguments,
        _plain(files_check.cmd_check_files),
    ),
    "prune": Command(
        "apply each mount's keep: remove old images through their backends", _add_prune, _plain(cmd_prune)
    ),
    "delete": Command(
        "remove checkpoints: their exports and images, then their manifests", _add_delete, _plain(cmd_delete)
    ),
    "recover": Command("thaw and clean up after a crash, from the journal", _add_nothing, _plain(cmd_recover)),
    "criu-hook": Command(
        "CRIU action script: image the filesystems at post-dump, put them back at pre-restore",
        _add_criu_hook,
        _plain(cmd_criu_hook),
        usage="snapcore [--state-dir S] criu-hook [--policy F] [PATH...] [--write-script FILE]; "
        "CRIU runs it: criu dump --action-script FILE ...",
    ),
    "policy": Command("policy tools: check a policy, print its JSON Schema", _add_policy, _plain(cmd_policy_check)),
    "agent": Command(
        "take this node's part in cluster checkpoints (checkpoint --cluster), coordinated on etcd",
        _add_agent,
        _plain(_agent),
        usage="snapcore [--state-dir S] [--run-dir R] agent --etcd URL --node NAME [--prefix KEY] [--lease TIME] "
        "[--policy F]",
    ),
}
