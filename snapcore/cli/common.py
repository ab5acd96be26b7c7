"""What the commands share: logging, the plugins, the policy, the state and run
directories from the command line, root, JSON and restore messages."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore.errors import UsageError
from snapcore.log import get_logger

if TYPE_CHECKING:
    from snapcore.plugins import Plugins
    from snapcore.policy import Policy

log = get_logger("snapcore")

#: Set for the command after ``restore ID ... --``: the checkpoint whose files were put
#: back already, in place or as a copy (the CRIU hook's pre-restore leaves them alone).
RESTORED_ENV = "SNAPCORE_RESTORED"


def setup_logging(verbose: int, quiet: int) -> None:
    from snapcore import log as logs

    logs.configure(verbose, quiet)


def plugins_of(args: argparse.Namespace) -> Plugins:
    from snapcore.plugins import make_plugins

    plugins = make_plugins(disabled=args.disable_plugin)
    from snapcore.log import apply_if_loaded

    apply_if_loaded()  # a plugin that imported logging may log with it at once
    for broken in plugins.broken:
        log.warning("plugin %s (%s) is broken: %s", broken.name, broken.distribution, broken.error)
    return plugins


def policy_of(args: argparse.Namespace) -> Policy:
    from snapcore.policy import Policy, load_policy

    return load_policy(args.policy) if getattr(args, "policy", None) else Policy.default()


def state_dir_arg(args: argparse.Namespace, policy: Policy | None = None) -> Path:
    from snapcore.policy import Policy, state_dir_of

    return state_dir_of(policy or Policy.default(), args.state_dir)


def run_dir_arg(args: argparse.Namespace) -> Path:
    from snapcore.host.locks import default_run_dir

    return Path(args.run_dir) if args.run_dir else default_run_dir()


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"{what} must run as root (freezing and snapshotting need CAP_SYS_ADMIN): try sudo")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def said(done: Any) -> None:
    print(f"{done.mount}: {done.message}", flush=True)
    if done.set_aside_id:
        print(f"{done.mount}: the state it replaced is checkpoint {done.set_aside_id}", flush=True)


def duration_arg(text: str) -> float:
    """An argparse ``type``: ``30s``, ``2m``, ``500ms`` → seconds (argparse says what
    is wrong with another value, exit 2)."""
    import argparse

    from snapcore.policy.model import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
