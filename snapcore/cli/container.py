"""``snapcore checkpoint --container RUNTIME:ID [-- RUNTIME ... checkpoint ... ID]``:
a container checkpointed by its own runtime, its filesystems made consistent with it.

snapcore runs the runtime's checkpoint command itself, with CRIU's action script
pointed (``CRIU_CONFIG_FILE``) at a relay (:mod:`snapcore.tasks.relay`) that hands
post-dump back to this process: the checkpoint of the filesystems runs here, already
loaded, while CRIU holds the container's tasks stopped. The container's own CRIU
config needs nothing; if it names ``snapcore criu-hook`` too, that hook leaves this
dump to us. The checkpoint id goes into CRIU's image directory
(``snapcore-checkpoint``) as the hook's does, so that ``snapcore restore ID --in-place
-- RUNTIME restore ...`` (or the hook at pre-restore) finds it.

What can happen, and what it leaves:

* the checkpoint fails (a backend, ``on_change: fail``, a cancellation): the hook
  answers an error, CRIU fails the dump and resumes the container; exit 1;
* the runtime fails after the checkpoint was made, or its id cannot be written beside
  the dump: the checkpoint goes with no dump, so it is deleted (said on stderr); exit 1;
* with ``--hand-off T`` (a move to another host): the images go into the export
  (``--send-images``) and the post-dump action waits, CRIU holding the container
  stopped, until the destination's ``restore --from`` answers: *restored* → the
  action answers ok, CRIU ends the container here (the runtime's command must not
  say ``--leave-running``); a failure or no answer within T → an error: CRIU
  resumes the container, it goes on here; the checkpoint is complete and kept; exit 1;
* the runtime ends without ever reaching the relay (its CRIU got neither our
  environment nor our ``criu``: podman with ``--runtime-flag criu=PATH``): the
  checkpoint the container's own ``criu-hook`` made, if it made one, is shown, with
  a note (exit 0); else exit 1, naming the cause, nothing made.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from snapcore.cli.common import log, plugins_of, policy_of, run_dir_arg, state_dir_arg
from snapcore.errors import CheckpointFailed, ExitCode, SnapcoreError, UsageError

if TYPE_CHECKING:
    from snapcore.plugins import Plugins
    from snapcore.policy import Policy
    from snapcore.store.manifest import Manifest
    from snapcore.tasks.relay import Request

#: What the relay's script waits for beyond the longest freeze deadline: the steps of
#: a checkpoint outside its window (inventory, exports, manifest). It only ever matters
#: for a snapcore that hangs: one that dies closes the relay and the script's wait ends.
ANSWER_MARGIN_S = 300.0


def cmd_checkpoint_container(args: argparse.Namespace, command: list[str] | None) -> int:
    from snapcore import api
    from snapcore.cli.commands import show_manifest
    from snapcore.cli.criu_hook import CRIU_ID_FILE
    from snapcore.host.tools import write_atomic
    from snapcore.safety.cancel import Cancel, on_signals
    from snapcore.tasks.relay import Relay
    from snapcore.tasks.runtimes import ContainerRef, checkpoint_command, container_pid
    from snapcore.transaction import TaskSpec
    from snapcore.transaction.targets import describe

    if args.pid is not None or args.cgroup:
        raise UsageError("--container names the tasks: it goes with neither --pid nor --cgroup")
    ref = ContainerRef.parse(args.container)
    argv = checkpoint_command(ref, command)
    hand_off = args.hand_off
    if hand_off is not None and any(a in ("--leave-running", "-leave-running") for a in argv):
        raise UsageError(
            "--hand-off ends the container here once the destination restored it: the runtime's checkpoint "
            "command must not say --leave-running"
        )
    plugins = plugins_of(args)
    policy = policy_of(args)
    state_dir, run_dir = state_dir_arg(args, policy), run_dir_arg(args)
    env, criu = _runtime_env()
    pid = container_pid(ref, argv, env)  # running, or a plain error now, before any dump
    spec = TaskSpec(pid=pid, stopped_by="CRIU", container=str(ref))
    # a policy that would refuse the checkpoint refuses it now, before the dump; and
    # what the checkpoint needs is loaded before CRIU stops the container for it
    api.rehearse(args.paths, policy=policy, state_dir=state_dir, run_dir=run_dir, plugins=plugins, tasks=spec)
    made: list[Manifest] = []
    before = set(_checkpoints(state_dir))
    failed: list[str] = []
    not_moved: list[str] = []  # a hand-off the destination did not take
    cancel = Cancel()

    def post_dump(request: Request) -> str:
        if made:  # CRIU 4.1 runs each action twice when driven over RPC
            return f"ok {made[0].id}"
        if failed or not_moved:
            return f"error {(failed or not_moved)[0]}"
        if request.init_pid != pid:  # another dump that inherited our environment
            return f"error this dump is of pid {request.init_pid}, not of container {ref} (pid {pid})"
        if cancel.is_set():
            failed.append(f"{cancel.reason}: checkpoint cancelled")
            return f"error {failed[0]}"
        # runc hands CRIU its image directory as a descriptor (/proc/PID/fd/N): its path
        images = os.path.realpath(request.images_dir)
        try:
            manifest = api.checkpoint(
                args.paths,
                policy=policy,
                checkpoint_id=args.checkpoint_id,
                state_dir=state_dir,
                run_dir=run_dir,
                plugins=plugins,
                cancel=cancel,
                send_images=args.send_images,
                hand_off=hand_off,
                tasks=TaskSpec(
                    pid=request.init_pid,
                    stopped_by="CRIU",
                    criu_images=images,
                    criu_via=f"snapcore checkpoint --container {ref}",
                    container=str(ref),
                ),
            )
        except CheckpointFailed as exc:
            failed.append(str(exc))
            if exc.manifest is not None:
                show_manifest(exc.manifest, args.json, sys.stdout, with_error=False)
            return f"error {exc}"
        except Exception as exc:  # a SnapcoreError, or a bug: CRIU gets an answer either way
            log.debug("post-dump failed", exc_info=True)
            failed.append(describe(exc))
            return f"error {failed[0]}"
        try:
            write_atomic(Path(images) / CRIU_ID_FILE, (manifest.id + "\n").encode(), mode=0o600)
        except OSError as exc:
            # without its id beside the dump, the checkpoint would never be found again
            gone = _delete(manifest.id, state_dir, run_dir, plugins)
            failed.append(f"{images}: cannot write the checkpoint id ({exc.strerror or exc}); {gone}")
            return f"error {failed[0]}"
        handoff = manifest.handoff or {}
        if hand_off is not None and handoff.get("state") != "moved":
            # CRIU resumes the container; the checkpoint is complete and stays
            reason = (handoff.get("answer") or {}).get("reason") or "no answer"
            show_manifest(manifest, args.json, sys.stdout, with_error=False)
            not_moved.append(f"checkpoint {manifest.id} is complete, but the container was not moved: {reason}")
            return f"error {not_moved[0]}"
        made.append(manifest)
        return f"ok {manifest.id}"

    with Relay(
        run_dir / "relay",
        timeout_s=_longest_freeze(policy) + ANSWER_MARGIN_S + (hand_off or 0.0),
        user_config=env.get("CRIU_CONFIG_FILE"),
        criu=criu,
    ) as relay:
        try:
            runtime = subprocess.Popen(argv, env=relay.env(env), stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise SnapcoreError(f"{argv[0]}: {exc.strerror or exc}") from None
        with on_signals(cancel):  # SIGTERM, Ctrl-C: the dump fails at post-dump, the container runs on
            status = relay.serve(runtime, post_dump)
    if not_moved:
        raise SnapcoreError(f"container {ref}: {not_moved[0]}; it runs on here")
    return _outcome(args, ref, argv, status, made, failed, pid, before)


def _delete(checkpoint_id: str, state_dir: Path, run_dir: Path, plugins: Plugins) -> str:
    """Delete a checkpoint that cannot be used; what happened, in words."""
    from snapcore import api

    try:
        api.delete([checkpoint_id], state_dir=state_dir, run_dir=run_dir, plugins=plugins)
    except SnapcoreError as exc:
        return f"checkpoint {checkpoint_id} could not be deleted ({exc}): 'snapcore delete {checkpoint_id}'"
    return f"checkpoint {checkpoint_id} was deleted"


def _checkpoints(state_dir: Path) -> list[str]:
    try:
        return os.listdir(state_dir / "checkpoints")
    except OSError:
        return []


def _longest_freeze(policy: Policy) -> float:
    rules = [*policy.rules.values(), *([policy.fallback] if policy.fallback else [])]
    return max((rule.freeze_timeout for rule in rules), default=0.0)


def _runtime_env() -> tuple[dict[str, str], str | None]:
    """Our environment, with the directory of the CRIU snapcore uses first on ``PATH``
    (runtimes run ``criu`` from ``PATH``; Debian's own 3.17 fails on this kernel),
    and that CRIU (None: none found; the runtime will say so)."""
    from snapcore.errors import CriuUnavailable
    from snapcore.tasks.criu import find_criu

    env = dict(os.environ)
    try:
        criu = find_criu(env)
    except CriuUnavailable:
        return env, None
    criu_dir = os.path.dirname(criu)
    path = [p for p in env.get("PATH", os.defpath).split(":") if p and p != criu_dir]
    env["PATH"] = ":".join([criu_dir, *path])
    return env, criu


def _outcome(
    args: argparse.Namespace,
    ref: object,
    argv: list[str],
    status: int,
    made: list[Manifest],
    failed: list[str],
    pid: int,
    before: set[str],
) -> int:
    from snapcore import api
    from snapcore.cli.commands import show_manifest
    from snapcore.tasks.criu import describe_failure

    if failed:
        raise SnapcoreError(f"container {ref}: {failed[0]} (the dump failed; the container runs on)")
    if status != 0:
        said = describe_failure(argv, status)
        if made:
            gone = _delete(made[0].id, state_dir_arg(args), run_dir_arg(args), plugins_of(args))
            said += f"; the checkpoint made at its post-dump has no dump to go with: {gone}"
        raise SnapcoreError(said)
    if not made:
        theirs = sorted(set(_checkpoints(state_dir_arg(args))) - before)
        if theirs:  # the container's own 'criu-hook' did it, the slow way
            print(
                f"snapcore: {argv[0]}'s CRIU did not reach this snapcore (it ran without CRIU_CONFIG_FILE and with "
                f"another criu than the one first on PATH); the container's own hook made checkpoint {theirs[-1]}",
                file=sys.stderr,
            )
            from snapcore import api

            show_manifest(api.show(theirs[-1], state_dir=state_dir_arg(args)), args.json, sys.stdout)
            return ExitCode.OK
        raise SnapcoreError(
            f"{argv[0]} checkpointed container {ref} (pid {pid}) without running snapcore's action script: its CRIU "
            "did not read CRIU_CONFIG_FILE (the runtime cleared the environment and ran a criu named by path, not "
            "the one first on PATH?); the container's files were not checkpointed: name 'snapcore criu-hook' in "
            "the container's CRIU config (org.criu.config) instead"
        )
    show_manifest(made[0], args.json, sys.stdout)
    return ExitCode.OK
