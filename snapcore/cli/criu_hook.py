"""``criu dump/restore --action-script 'snapcore criu-hook'``: image the dumped tasks'
filesystems at post-dump, put them back at pre-restore."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snapcore.cli.common import plugins_of, policy_of, run_dir_arg, said, state_dir_arg
from snapcore.errors import SnapcoreError

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
        policy = policy_of(args)
        manifest = api.checkpoint(
            args.paths,
            policy=policy,
            state_dir=state_dir_arg(args, policy),
            run_dir=run_dir_arg(args),
            plugins=plugins_of(args),
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
        api.restore(
            checkpoint_id, in_place=True, state_dir=state_dir_arg(args), plugins=plugins_of(args), on_restored=said
        )

    return handle_action({"post-dump": post_dump, "pre-restore": pre_restore})
