"""The caller's payload (``-- CMD`` or a callable): run once every target has its
image, with the tasks still frozen; a ``criu dump`` is told what it needs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from snapcore.errors import PayloadFailed, UsageError
from snapcore.safety.faults import inject
from snapcore.types import Checkpoint

if TYPE_CHECKING:
    from snapcore.transaction.core import Transaction

#: What a payload may be: a command line, or a callable given the checkpoint.
Payload = Sequence[str] | Callable[[Checkpoint], int | None]


def check_payload(payload: Payload | None) -> None:
    """Refuse a command that cannot run, before anything is frozen."""
    if payload is None or callable(payload):
        return
    argv = list(payload)
    if not argv:
        raise UsageError("empty command after '--'")
    import shutil

    if shutil.which(argv[0]) is None:
        raise UsageError(f"command not found: {argv[0]}")


def run_payload(txn: Transaction, payload: Payload) -> None:
    """Run ``payload``; a non-zero status (or a cancellation while it runs) fails the
    checkpoint. A command gets ``SNAPCORE_CHECKPOINT_ID``, ``SNAPCORE_STATE_DIR`` and
    ``SNAPCORE_IMAGE_N=MOUNT=PATH`` in its environment."""
    assert txn.info is not None
    inject("payload")
    if callable(payload):
        status = payload(txn.info)
        if status:
            raise PayloadFailed(f"payload returned {status}")
        return
    cmd = list(payload)
    env = dict(os.environ)
    env["SNAPCORE_CHECKPOINT_ID"] = txn.id
    env["SNAPCORE_STATE_DIR"] = str(txn.state_dir)
    for i, run in enumerate(txn.active):
        if run.image is not None and run.image.path:
            env[f"SNAPCORE_IMAGE_{i}"] = f"{run.mount_point}={run.image.path}"
    cmd = _criu_payload(txn, cmd, env)
    import subprocess

    txn.cancel.check()
    try:
        proc = subprocess.Popen(cmd, env=env)
    except OSError as exc:
        raise PayloadFailed(f"cannot run {cmd[0]!r}: {exc.strerror}") from exc
    # cancelled: the payload is told as a terminal's Ctrl-C would tell it (it shares
    # our process group), and SIGTERM reaches it too
    with txn.cancel.on_cancel(proc.terminate):
        try:
            proc.wait()
        finally:
            if proc.returncode is None:  # interrupted by an exception: no payload left behind
                proc.kill()
                proc.wait()
    txn.manifest.payload = {"argv": cmd, "status": proc.returncode}
    txn.cancel.check()
    if proc.returncode != 0:
        from snapcore.tasks.criu import describe_failure

        raise PayloadFailed(describe_failure(cmd, proc.returncode))


def _criu_payload(txn: Transaction, cmd: list[str], env: dict[str, str]) -> list[str]:
    """A ``criu dump`` of tasks we froze must be told their freezer cgroup, or
    it hangs trying to interrupt them; its image directory goes in the manifest."""
    group = txn.tasks.criu_freeze_cgroup if txn.tasks is not None else None
    if group:
        env["SNAPCORE_FREEZE_CGROUP"] = str(group)
    if os.path.basename(cmd[0]) != "criu" or "dump" not in cmd[1:]:
        return cmd
    images = None
    for i, arg in enumerate(cmd):
        if arg in ("-D", "--images-dir") and i + 1 < len(cmd):
            images = cmd[i + 1]
        elif arg.startswith("--images-dir="):
            images = arg.split("=", 1)[1]
    if group and not any(a == "--freeze-cgroup" or a.startswith("--freeze-cgroup=") for a in cmd):
        cmd = [*cmd, "--freeze-cgroup", str(group)]
    if txn.hand_off is not None and not any(a in ("-R", "--leave-running") for a in cmd):
        # the tasks stay (frozen by us) until the destination says it restored them
        cmd = [*cmd, "--leave-running"]
    txn.manifest.criu = {"images_dir": os.path.abspath(images) if images else None, "argv": cmd}
    return cmd
