"""The ``snapcore`` command line's parser: argparse, told the terminal's width, with
usage errors as :class:`UsageError`, and built for the one command named when that
is certain (argparse spends milliseconds on every command it is told of)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from snapcore import __version__
from snapcore.errors import UsageError


class Formatter(argparse.HelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a :class:`UsageError` (exit 2, one line)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see '{self.prog} --help')")


#: Options of the top-level parser that take a value (for :func:`command_of`).
_VALUED = ("--state-dir", "--run-dir", "--disable-plugin")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` the top level and that one command:
    argparse spends milliseconds on every command it is told of."""
    parser = Parser(
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
    from snapcore.cli.commands import COMMANDS

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, command in COMMANDS.items():
        if only is None or name == only:
            command.add_arguments(sub.add_parser(name, help=command.help, usage=command.usage))
    return parser


def command_of(argv: Sequence[str]) -> str | None:
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
            from snapcore.cli.commands import COMMANDS

            return arg if arg in COMMANDS else None
    return None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    only = command_of(argv)
    if only is not None:
        try:
            return build_parser(only).parse_args(argv)
        except UsageError:
            pass  # an abbreviated option made us guess wrong: the whole parser says why
    return build_parser().parse_args(argv)
