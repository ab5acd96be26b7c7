"""The ``snapcore`` command. ``main(argv) -> int``; heavy modules load per command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore import __version__
from snapcore.errors import CheckpointFailed, ExitCode, SnapcoreError, UsageError
from snapcore.log import get_logger

if TYPE_CHECKING:
    from snapcore.plugins import Plugins
    from snapcore.policy import Policy

log = get_logger("snapcore")


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, told the terminal's width: left to itself it imports
    :mod:`shutil` (and its compression modules, ~1.4 ms) for every command line."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        if width is None:  # as shutil.get_terminal_size(), less 2 as argparse does
            try:
                columns = int(os.environ.get("COLUMNS", ""))
            except ValueError:
                columns = 0
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
                except (AttributeError, ValueError, OSError):
                    columns = 80
            width = (columns or 80) - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a :class:`UsageError` (exit 2, one line)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see '{self.prog} --help')")


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


def _add_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint_id", metavar="ID")
    p.add_argument("--json", action="store_true")


def _add_restore(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint_id", metavar="ID", nargs="?")
    p.add_argument(
        "--from", dest="from_dir", metavar="EXPORT_DIR", help="restore from an export directory alone (instead of ID)"
    )
    p.add_argument("--mount", metavar="M", help="only this mount point")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DIR", help="restore into DIR (a new place)")
    where.add_argument("--in-place", action="store_true", help="roll the mount back in place")
    p.add_argument(
        "--safe",
        action="store_true",
        help="with --to: leave out device nodes, FIFOs and sockets, clear setuid/setgid bits and file "
        "capabilities (for an export you do not trust)",
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
    p.add_argument("paths", nargs="*", metavar="PATH")


def _add_policy(p: argparse.ArgumentParser) -> None:
    policy_sub = p.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
    policy_sub.required = True
    c = policy_sub.add_parser("check", help="validate a policy, print problems")
    c.add_argument("file", metavar="F")


#: name -> (help, usage or None, adds its arguments)
_COMMANDS: dict[str, tuple[str, str | None, Any]] = {
    "backends": ("installed backends, roles, versions, broken plugins", None, _add_backends),
    "plan": ("per mount: chosen imager/exporter and why; touches nothing", None, _add_plan),
    "checkpoint": (
        "freeze, image, (run CMD), thaw, export; write the manifest",
        "snapcore checkpoint [--policy F] [PATH...] [--id ID] [--json] [-- CMD ARGS...]",
        _add_checkpoint,
    ),
    "list": ("checkpoints, newest first", None, _add_list),
    "show": ("one manifest", None, _add_show),
    "restore": ("bring a checkpoint's images back", None, _add_restore),
    "verify": ("images and exports still there and intact", None, _add_verify),
    "prune": ("apply each mount's keep: remove old images through their backends", None, _add_prune),
    "delete": ("remove checkpoints: their exports and images, then their manifests", None, _add_delete),
    "recover": ("thaw and clean up after a crash, from the journal", None, _add_nothing),
    "criu-hook": (
        "CRIU action script: image the filesystems at post-dump, put them back at pre-restore",
        "criu dump --action-script 'snapcore [--state-dir S] criu-hook [--policy F]' ...",
        _add_criu_hook,
    ),
    "policy": ("policy tools", None, _add_policy),
}
#: Options of the top-level parser that take a value (for :func:`_command_of`).
_VALUED = ("--state-dir", "--run-dir", "--disable-plugin")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` the top level and that one command:
    argparse spends milliseconds on every command it is told of."""
    parser = _Parser(
        prog="snapcore",
        description="Make the filesystems under a process checkpoint consistent with it.",
    )
    parser.add_argument("--version", action="version", version=f"snapcore {__version__}")
    parser.add_argument(
        "--state-dir",
        default=None,
        help="manifests live in STATE/checkpoints/ID (env SNAPCORE_STATE_DIR; default /var/lib/snapcore)",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="journal and locks (env SNAPCORE_RUN_DIR; default /run/snapcore)",
    )
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME", help="do not load this plugin")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more diagnostics on stderr")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="only errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (help_text, usage, add) in _COMMANDS.items():
        if only is None or name == only:
            add(sub.add_parser(name, help=help_text, usage=usage))
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``, when that is certain (else None: parse it all)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED:
            skip = True
        elif arg.startswith("-"):
            if arg in ("-h", "--help", "--version") or arg == "--":
                return None
        else:
            return arg if arg in _COMMANDS else None
    return None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    only = _command_of(argv)
    if only is not None:
        try:
            return build_parser(only).parse_args(argv)
        except UsageError:
            pass  # an abbreviated option made us guess wrong: the whole parser says why
    return build_parser().parse_args(argv)


def _setup_logging(verbose: int, quiet: int) -> None:
    from snapcore import log as logs

    logs.configure(verbose, quiet)


def _plugins(args: argparse.Namespace) -> Plugins:
    from snapcore.plugins import make_plugins

    plugins = make_plugins(disabled=args.disable_plugin)
    from snapcore.log import apply_if_loaded

    apply_if_loaded()  # a plugin that imported logging may log with it at once
    for broken in plugins.broken:
        log.warning("plugin %s (%s) is broken: %s", broken.name, broken.distribution, broken.error)
    return plugins


def _policy(args: argparse.Namespace) -> Policy:
    from snapcore.policy import Policy, load_policy

    return load_policy(args.policy) if getattr(args, "policy", None) else Policy.default()


def _state_dir(args: argparse.Namespace, policy: Policy | None = None) -> Path:
    from snapcore.policy import Policy, state_dir_of

    return state_dir_of(policy or Policy.default(), args.state_dir)


CRIU_ID_FILE = "snapcore-checkpoint"


def cmd_criu_hook(args: argparse.Namespace) -> int:
    """``criu dump/restore --action-script 'snapcore criu-hook'``."""
    from snapcore import api
    from snapcore.tasks.criu import ActionEvent, handle_action
    from snapcore.transaction import TaskSpec

    def post_dump(event: ActionEvent) -> None:
        # CRIU holds the tasks stopped: image their filesystems now
        if event.init_pid is None or event.images_dir is None:
            raise SnapcoreError("post-dump without CRTOOLS_INIT_PID or CRTOOLS_IMAGE_DIR")
        policy = _policy(args)
        manifest = api.checkpoint(
            args.paths,
            policy=policy,
            state_dir=_state_dir(args, policy),
            run_dir=_run_dir(args),
            plugins=_plugins(args),
            tasks=TaskSpec(pid=event.init_pid, stopped_by="CRIU", criu_images=event.images_dir),
        )
        (Path(event.images_dir) / CRIU_ID_FILE).write_text(manifest.id + "\n")
        print(f"snapcore: checkpoint {manifest.id} of the dumped tasks' filesystems", file=sys.stderr)

    def pre_restore(event: ActionEvent) -> None:
        # before CRIU opens the files: put the checkpoint's images back in place
        if event.images_dir is None:
            raise SnapcoreError("pre-restore without CRTOOLS_IMAGE_DIR")
        id_file = Path(event.images_dir) / CRIU_ID_FILE
        if not id_file.exists():
            raise SnapcoreError(f"{id_file} is missing: these CRIU images were not dumped through snapcore criu-hook")
        checkpoint_id = id_file.read_text().strip()
        api.restore(checkpoint_id, in_place=True, state_dir=_state_dir(args), plugins=_plugins(args), on_restored=_said)

    return handle_action({"post-dump": post_dump, "pre-restore": pre_restore})


def _run_after_restore(command: list[str]) -> int:
    """``snapcore restore ID -- criu restore -D DIR``: the files first, then CMD."""
    import shutil
    import subprocess

    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]}")
    status = subprocess.run(command, check=False).returncode
    if status != 0:
        from snapcore.tasks.criu import describe_failure

        raise SnapcoreError(describe_failure(command, status))
    return ExitCode.OK


def _run_dir(args: argparse.Namespace) -> Path:
    from snapcore.host.locks import default_run_dir

    return Path(args.run_dir) if args.run_dir else default_run_dir()


def cmd_recover(args: argparse.Namespace) -> int:
    from snapcore import api

    _require_root("snapcore recover")
    report = api.recover(run_dir=_run_dir(args), plugins=_plugins(args))
    if not report:
        print("nothing to recover")
    for recovered in report:
        print(f"checkpoint {recovered.checkpoint_id}: marked failed")
        for line in recovered.done:
            print(f"  {line}")
    return ExitCode.OK


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} must run as root (freezing and snapshotting need CAP_SYS_ADMIN): try sudo")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


# -- commands ------------------------------------------------------------------------


def cmd_backends(args: argparse.Namespace) -> int:
    plugins = _plugins(args)
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
        _print_json({"backends": rows, "broken": broken})
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

    plugins = _plugins(args)
    policy = _policy(args)
    selections, warnings = plan(plugins, policy, args.paths)  # api.plan, with the warnings
    if args.json:
        _print_json(
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

    _require_root("snapcore checkpoint")
    plugins = _plugins(args)
    policy = _policy(args)
    if not args.paths and policy.path is None and args.pid is None and not args.cgroup:
        raise UsageError("nothing to checkpoint: give PATHs, --pid, --cgroup, or a --policy that names mounts")
    cancel = Cancel()
    try:
        with on_signals(cancel):  # SIGTERM, Ctrl-C: cancel, thaw, undo, exit 1
            manifest = api.checkpoint(
                args.paths,
                policy=policy,
                checkpoint_id=args.checkpoint_id,
                state_dir=_state_dir(args, policy),
                run_dir=_run_dir(args),
                payload=command,
                plugins=plugins,
                cancel=cancel,
                pid=args.pid,
                cgroup=args.cgroup or None,
            )
    except CheckpointFailed as exc:
        if exc.manifest is not None:
            # the error itself follows once, on stderr ("snapcore: error: ...")
            _show(exc.manifest, args.json, sys.stdout, with_error=False)
        raise
    _show(manifest, args.json, sys.stdout)
    if cancel.is_set():
        print(f"snapcore: {cancel.reason} too late to cancel: checkpoint {manifest.id} is complete", file=sys.stderr)
    return ExitCode.OK


def _show(manifest: Any, as_json: bool, out: Any, *, with_error: bool = True) -> None:
    if as_json:
        out.write(manifest.dumps())
    else:
        out.write(manifest.summary(with_error=with_error) + "\n")
    out.flush()


def cmd_list(args: argparse.Namespace) -> int:
    from snapcore import api

    rows: list[dict[str, Any]] = []
    for listed in api.list_checkpoints(state_dir=_state_dir(args)):
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
            }
        )
    if args.json:
        _print_json(rows)
        return ExitCode.OK
    for row in rows:
        mounts = " ".join(row.get("mounts") or [])
        print(f"{row['id']:<28} {row['outcome']:<10} {row.get('started') or '-':<25} {mounts}")
        if row.get("error"):
            print(f"    {row['error']}")
    return ExitCode.OK


def cmd_show(args: argparse.Namespace) -> int:
    from snapcore import api

    _show(api.show(args.checkpoint_id, state_dir=_state_dir(args)), args.json, sys.stdout)
    return ExitCode.OK


def _which(args: argparse.Namespace) -> None:
    if (args.checkpoint_id is None) == (args.from_dir is None):
        raise UsageError(f"give a checkpoint ID or --from EXPORT_DIR (see 'snapcore {args.command} --help')")


def _said(done: Any) -> None:
    print(f"{done.mount}: {done.message}", flush=True)
    if done.set_aside_id:
        print(f"{done.mount}: the state it replaced is checkpoint {done.set_aside_id}", flush=True)


def cmd_restore(args: argparse.Namespace, then: Sequence[str] | None = None) -> int:
    """``snapcore restore``; ``then`` is the command to run after it (``-- CMD``)."""
    from snapcore import api

    _require_root("snapcore restore")
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
        before_criu_restore=bool(then and os.path.basename(then[0]) == "criu" and "restore" in then[1:]),
        state_dir=_state_dir(args),
        plugins=_plugins(args),
        on_restored=_said,
    )
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from snapcore import api

    _which(args)
    found = api.verify(args.checkpoint_id, from_dir=args.from_dir, state_dir=_state_dir(args), plugins=_plugins(args))
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
        _require_root("snapcore prune")
    report = api.prune(dry_run=args.dry_run, state_dir=_state_dir(args), run_dir=_run_dir(args), plugins=_plugins(args))
    for line in describe(report, args.dry_run):
        print(line)
    if report.errors:
        raise SnapcoreError(f"prune: {len(report.errors)} image(s) could not be removed")
    return ExitCode.OK


def cmd_delete(args: argparse.Namespace) -> int:
    from snapcore import api

    if not args.dry_run:
        _require_root("snapcore delete")
    done = api.delete(
        args.checkpoint_ids,
        mounts=args.mount,
        dry_run=args.dry_run,
        state_dir=_state_dir(args),
        run_dir=_run_dir(args),
        plugins=_plugins(args),
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

    problems = api.check_policy(args.file, plugins=_plugins(args))
    for problem in problems:
        print(f"snapcore: error: {problem}", file=sys.stderr)
    if problems:
        return ExitCode.USAGE
    policy = load_policy(args.file)
    n = len(policy.rules) + (1 if policy.fallback else 0)
    print(f"{args.file}: OK ({n} rule(s))")
    return ExitCode.OK


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    args_list, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parse_args(args_list)
        _setup_logging(args.verbose, args.quiet)
        if os.geteuid() == 0 and (
            args.command == "checkpoint"
            or (args.command == "criu-hook" and os.environ.get("CRTOOLS_SCRIPT_ACTION") == "post-dump")
        ):
            # the guard boots on the other CPU while this process loads the rest; if
            # it cannot start now, the checkpoint tries again and says why
            from snapcore.errors import GuardError
            from snapcore.safety.deadline import start_guard

            with contextlib.suppress(GuardError):
                start_guard()
        if command is not None and args.command not in ("checkpoint", "restore"):
            raise UsageError(f"'-- CMD' is only for 'snapcore checkpoint' and 'restore', not {args.command!r}")
        if args.command == "checkpoint":
            return int(cmd_checkpoint(args, command))
        if args.command == "restore":
            code = int(cmd_restore(args, then=command))
            if command:
                return _run_after_restore(command)
            return code
        handlers = {
            "backends": cmd_backends,
            "plan": cmd_plan,
            "list": cmd_list,
            "show": cmd_show,
            "restore": cmd_restore,
            "verify": cmd_verify,
            "recover": cmd_recover,
            "criu-hook": cmd_criu_hook,
            "prune": cmd_prune,
            "delete": cmd_delete,
            "policy": cmd_policy_check,
        }
        return int(handlers[args.command](args))
    except SnapcoreError as exc:
        print(f"snapcore: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("snapcore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return int(ExitCode.FAILED)


def entry() -> None:
    """The ``snapcore`` command: :func:`main`, then leave without tearing the
    interpreter down. Finalising ~250 modules was measured at 7-10 ms of a 65 ms
    checkpoint (more with a forked guard: the teardown writes to every page the two
    processes share). Everything of ours is closed by then; the exit handlers
    (logging's flush, temporary directories' cleanup) still run."""
    code = main()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what was lost is lost either way
            code = code or int(ExitCode.FAILED)
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
