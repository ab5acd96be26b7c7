"""The ``snapcore`` command. ``main(argv) -> int``; heavy modules load per command.

:mod:`.parser` reads the command line, :mod:`.commands` holds every command (its
arguments, and what it does through :mod:`snapcore.api`; the CRIU action script is
:mod:`.criu_hook`, what they share :mod:`.common`), and :func:`main` is the one
place a :class:`SnapcoreError` becomes a message and an exit code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

from snapcore.cli.parser import build_parser, command_of, parse_args
from snapcore.errors import ExitCode, SnapcoreError, UsageError


def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, None


def main(argv: Sequence[str] | None = None) -> int:
    args_list, command = _split_command(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parse_args(args_list)
        from snapcore.cli.commands import COMMANDS
        from snapcore.cli.common import setup_logging

        setup_logging(args.verbose, args.quiet)
        if os.geteuid() == 0 and (
            (args.command == "checkpoint" and not args.cluster)
            or (args.command == "criu-hook" and os.environ.get("CRTOOLS_SCRIPT_ACTION") == "post-dump")
        ):
            # the guard boots on the other CPU while this process loads the rest; if
            # it cannot start now, the checkpoint tries again and says why
            from snapcore.errors import GuardError
            from snapcore.safety.deadline import start_guard

            with contextlib.suppress(GuardError):
                start_guard()
        chosen = COMMANDS[args.command]
        if command is not None and not chosen.takes_command:
            raise UsageError(f"'-- CMD' is only for 'snapcore checkpoint' and 'restore', not {args.command!r}")
        return int(chosen.run(args, command))
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


__all__ = ["build_parser", "command_of", "entry", "main", "parse_args"]
