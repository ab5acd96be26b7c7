"""``criu dump/restore --action-script 'snapcore criu-hook'``: image the dumped tasks'
filesystems at post-dump, put them back at pre-restore.

Made for how runtimes call it:

* **Once per CRIU run.** CRIU 4.1 runs every action script twice when a runtime drives
  it over RPC (runc, podman: it parses the runtime's config file twice; fixed in 4.2).
  The CRIU process that runs the hook (the hook's parent, with its start time) names
  the run; the first call leaves a marker in the run directory and a second call of
  the same action in the same run does nothing but say so.
* **Next to nothing for the actions it ignores.** CRIU calls the script 10-12 times
  per dump or restore; ``snapcore criu-hook --write-script PATH`` writes a small sh
  script for CRIU's ``action-script`` that starts Python only for ``post-dump`` and
  ``pre-restore`` (``bench/criu_hook.py`` measures both).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from snapcore.cli.common import RESTORED_ENV, plugins_of, policy_of, run_dir_arg, said, state_dir_arg
from snapcore.errors import MountBusy, SnapcoreError, UsageError

if TYPE_CHECKING:
    from snapcore.tasks.criu import ActionEvent

CRIU_ID_FILE = "snapcore-checkpoint"
#: The actions the hook acts on; every other one returns at once.
HANDLED = ("post-dump", "pre-restore")
#: Bytes of the id file read from an image directory (it holds one checkpoint id).
ID_FILE_LIMIT = 4096


def _criu_process() -> int:
    """The CRIU process that runs this hook: the nearest ancestor named ``criu`` (a
    shell between them, when ``sh -c`` does not exec, differs at every call), else
    the parent."""
    from snapcore.tasks.holders import comm_of
    from snapcore.tasks.resolve import parent_of

    pid = os.getppid()
    for _ in range(4):
        if pid <= 1:
            break
        if comm_of(pid) == "criu":
            return pid
        pid = parent_of(pid)
    return os.getppid()


def criu_run() -> str:
    """This CRIU run: the pid and start time of the CRIU process that runs the hook."""
    from snapcore.host.fsutil import process_start_time

    pid = _criu_process()
    return f"{pid}-{process_start_time(pid) or 0}"


def _marker(args: argparse.Namespace, action: str) -> Path:
    from snapcore.safety.journal import secure_dir

    return secure_dir(secure_dir(run_dir_arg(args)) / "criu") / f"{criu_run()}.{action}"


def _done_before(marker: Path) -> str | None:
    """The checkpoint id a first call of this action in this CRIU run handled."""
    from snapcore.host.fsutil import read_regular

    try:
        return read_regular(marker, ID_FILE_LIMIT, owned=True).decode("utf-8", "replace").strip() or "?"
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapcoreError(f"{marker}: {exc.strerror}") from None


def _remember(marker: Path, checkpoint_id: str) -> None:
    from snapcore.host.tools import write_atomic

    write_atomic(marker, (checkpoint_id + "\n").encode(), mode=0o600)
    _forget_dead_runs(marker.parent)


def _once_per_criu_run(
    args: argparse.Namespace, handler: Callable[[ActionEvent], str | None], again: str
) -> Callable[[ActionEvent], None]:
    """``handler`` run at most once per action and CRIU run: a repeated call says
    which checkpoint the first one handled (``again``) and does nothing; the id the
    handler returns is remembered (None: nothing to remember)."""

    def run(event: ActionEvent) -> None:
        marker = _marker(args, event.action)
        done = _done_before(marker)
        if done is not None:
            print(f"snapcore: checkpoint {done} {again}", file=sys.stderr)
            return
        checkpoint_id = handler(event)
        if checkpoint_id is not None:
            _remember(marker, checkpoint_id)

    return run


def _forget_dead_runs(directory: Path) -> None:
    """Markers of CRIU runs whose process is gone (or was another one)."""
    from snapcore.host.fsutil import process_start_time

    for entry in directory.iterdir():
        pid, _, rest = entry.name.partition("-")
        start = rest.split(".", 1)[0]
        if pid.isdigit() and process_start_time(int(pid)) != start:
            entry.unlink(missing_ok=True)


def leave_runtime_cgroups() -> None:
    """Out of the container's cgroups, into the runtime's (see
    :func:`snapcore.tasks.cgroups.join_cgroups_of_caller`); said on stderr (CRIU's log)."""
    from snapcore.tasks.cgroups import join_cgroups_of_caller

    try:
        moved = join_cgroups_of_caller()
    except OSError as exc:
        print(
            f"snapcore: could not leave the container's cgroups ({exc.strerror}): mounting a device may be "
            "refused here; if so, restore first and run the runtime after it: "
            "snapcore restore ID --in-place -- RUNTIME restore ...",
            file=sys.stderr,
        )
        return
    if moved:
        print(f"snapcore: {moved}", file=sys.stderr)


def read_checkpoint_id(images_dir: str) -> str:
    """The checkpoint id a post-dump wrote into CRIU's image directory (untrusted: a
    regular file, bounded, one plain id)."""
    from snapcore.host.fsutil import read_regular
    from snapcore.store.confine import plain_name

    id_file = Path(images_dir) / CRIU_ID_FILE
    try:
        text = read_regular(id_file, ID_FILE_LIMIT).decode("utf-8", "replace")
    except FileNotFoundError:
        raise SnapcoreError(
            f"{id_file} is missing: these CRIU images were not dumped through snapcore criu-hook"
        ) from None
    except OSError as exc:
        raise SnapcoreError(f"{id_file}: {exc.strerror or exc}") from None
    lines = text.splitlines()
    return plain_name(lines[0].strip() if lines else "", what=f"the checkpoint id in {id_file}")


def cmd_criu_hook(args: argparse.Namespace) -> int:
    """``criu dump/restore --action-script 'snapcore criu-hook'``."""
    if args.write_script:
        return write_script(args)
    from snapcore.tasks.relay import RELAY_ENV

    relay = os.environ.get(RELAY_ENV)
    if relay and os.environ.get("CRTOOLS_SCRIPT_ACTION") == "post-dump":
        print(f"snapcore: this dump is handled by 'snapcore checkpoint --container' (pid {relay})", file=sys.stderr)
        return 0
    from snapcore import api
    from snapcore.tasks.criu import handle_action
    from snapcore.transaction import TaskSpec

    def post_dump(event: ActionEvent) -> str:
        # CRIU holds the tasks stopped: image their filesystems now
        if event.init_pid is None or event.images_dir is None:
            raise SnapcoreError("post-dump without CRTOOLS_INIT_PID or CRTOOLS_IMAGE_DIR")
        leave_runtime_cgroups()
        policy = policy_of(args)
        manifest = api.checkpoint(
            args.paths,
            policy=policy,
            state_dir=state_dir_arg(args, policy),
            run_dir=run_dir_arg(args),
            plugins=plugins_of(args),
            tasks=TaskSpec(pid=event.init_pid, stopped_by="CRIU", criu_images=event.images_dir),
        )
        from snapcore.host.tools import write_atomic

        write_atomic(Path(event.images_dir) / CRIU_ID_FILE, (manifest.id + "\n").encode(), mode=0o600)
        print(f"snapcore: checkpoint {manifest.id} of the dumped tasks' filesystems", file=sys.stderr)
        return manifest.id

    def pre_restore(event: ActionEvent) -> str | None:
        # before CRIU opens the files: put the checkpoint's images back in place
        if event.images_dir is None:
            raise SnapcoreError("pre-restore without CRTOOLS_IMAGE_DIR")
        checkpoint_id = read_checkpoint_id(event.images_dir)
        if os.environ.get(RESTORED_ENV) == checkpoint_id:
            print(f"snapcore: checkpoint {checkpoint_id} was restored already ('snapcore restore')", file=sys.stderr)
            return None
        leave_runtime_cgroups()  # runc and podman run CRIU in the container's cgroups at restore
        try:
            api.restore(
                checkpoint_id, in_place=True, state_dir=state_dir_arg(args), plugins=plugins_of(args), on_restored=said
            )
        except MountBusy as exc:
            # runc binds the rootfs for CRIU before this hook runs: a rollback now would
            # not reach the container, which would run on the tree it replaced
            raise SnapcoreError(
                f"{exc} -- from a CRIU hook, the runtime may already hold the old tree: restore the files "
                f"first, then run the runtime: snapcore restore {checkpoint_id} --in-place -- RUNTIME restore ..."
            ) from None
        except SnapcoreError as exc:
            raise SnapcoreError(
                f"{exc} -- or restore a copy and run the runtime on it: snapcore restore {checkpoint_id} "
                "--to DIR -- RUNTIME restore ... (with the container's root and volumes in DIR)"
            ) from None
        return checkpoint_id

    return handle_action(
        {
            "post-dump": _once_per_criu_run(args, post_dump, "was made at this dump's first post-dump call"),
            "pre-restore": _once_per_criu_run(
                args, pre_restore, "was restored at this restore's first pre-restore call"
            ),
        }
    )


SCRIPT = """#!/bin/sh
# CRIU action script, written by 'snapcore criu-hook --write-script'. CRIU runs it at
# every action; only post-dump and pre-restore start Python (~0.1 s); any other
# returns at once.
case "$CRTOOLS_SCRIPT_ACTION" in
post-dump)
  if [ -n "$SNAPCORE_RELAY" ]; then
    echo "snapcore: this dump is handled by 'snapcore checkpoint --container' (pid $SNAPCORE_RELAY)" >&2
    exit 0
  fi
  exec {command} ;;
pre-restore)
  # the files were put back already by 'snapcore restore ID ... -- RUNTIME restore'
  # (which sets SNAPCORE_RESTORED=ID): say so without starting Python
  if [ -n "$SNAPCORE_RESTORED" ] && [ -n "$CRTOOLS_IMAGE_DIR" ] &&
     [ "$(head -c 200 "$CRTOOLS_IMAGE_DIR/{id_file}" 2>/dev/null | head -n 1)" = "$SNAPCORE_RESTORED" ]; then
    echo "snapcore: checkpoint $SNAPCORE_RESTORED was restored already ('snapcore restore')" >&2
    exit 0
  fi
  exec {command} ;;
esac
exit 0
"""


def write_script(args: argparse.Namespace) -> int:
    """Write the action script for CRIU's ``action-script`` (or ``--action-script``):
    this interpreter and these options baked in, Python started only for the
    actions the hook handles."""
    from snapcore.host.tools import write_atomic

    path = Path(os.path.abspath(args.write_script))
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UsageError(f"{path} exists and is not a regular file: refusing to replace it")
    argv = [sys.executable, "-m", "snapcore"]
    if args.state_dir:
        argv += ["--state-dir", os.path.abspath(args.state_dir)]
    if args.run_dir:
        argv += ["--run-dir", os.path.abspath(args.run_dir)]
    for name in args.disable_plugin:
        argv += ["--disable-plugin", name]
    argv.append("criu-hook")
    if args.policy:
        argv += ["--policy", os.path.abspath(args.policy)]
    argv += [os.path.abspath(p) for p in args.paths]
    text = SCRIPT.format(command=shlex.join(argv), id_file=CRIU_ID_FILE)
    write_atomic(path, text.encode(), mode=0o755)
    print(f"{path}: CRIU action script (name it in CRIU's config: action-script {path})")
    return 0
