"""The destination's side of a move (``restore --from EXPORT_DIR ... -- criu restore``):
wait for the export to be complete (``--wait``), run ``criu restore`` on the images
the export carries (``EXPORT_DIR/criu``, when the command names no ``-D``), and
answer the source when its manifest says it waits (``checkpoint --hand-off``):
``handoff.json`` in the export directory, *restored* only once the command succeeded.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from snapcore.errors import SnapcoreError
from snapcore.store.export_files import IMAGES_NAME, write_answer
from snapcore.store.manifest import MANIFEST_NAME, Manifest, read_manifest

#: How often ``--wait`` looks for the export's manifest copy.
POLL_S = 0.05

Answerer = Callable[[bool, str], None]


def wait_for_export(from_dir: Path, wait_s: float) -> None:
    """Until the export directory holds its manifest copy (the exporter writes it
    last: the export is complete), at most ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while not os.path.lexists(from_dir / MANIFEST_NAME):
        if time.monotonic() >= deadline:
            raise SnapcoreError(f"{from_dir}: no complete export (no {MANIFEST_NAME}) after {wait_s:g} s of waiting")
        time.sleep(POLL_S)


def export_manifest(from_dir: Path | None) -> Manifest | None:
    """The manifest copy an export directory carries, read once for what follows; None
    when there is none to read (the restore itself then says what is wrong)."""
    if from_dir is None:
        return None
    try:
        return read_manifest(from_dir / MANIFEST_NAME)
    except (OSError, SnapcoreError):
        return None


def is_criu_restore(command: Sequence[str] | None) -> bool:
    """``command`` runs ``criu restore``."""
    return (
        command is not None
        and len(command) > 1
        and os.path.basename(command[0]) == "criu"
        and ("restore" in command[1:])
    )


def answerer(from_dir: Path | None, manifest: Manifest | None) -> Answerer | None:
    """How to answer the source, when the export's manifest says it waits for an answer."""
    if from_dir is None or manifest is None:
        return None
    handoff = manifest.handoff or {}
    if handoff.get("state") != "waiting":
        return None
    checkpoint_id = manifest.id

    def answer(restored: bool, reason: str) -> None:
        try:
            write_answer(from_dir, checkpoint_id, restored, reason)
        except OSError as exc:
            print(f"snapcore: cannot answer the source in {from_dir}: {exc.strerror or exc}", file=sys.stderr)
            return
        said = "it may end the program there" if restored else "the program goes on there"
        print(f"checkpoint {checkpoint_id}: told the source ({said})", flush=True)

    return answer


def with_images(command: list[str], from_dir: Path | None) -> list[str]:
    """``criu restore`` without ``-D``/``--images-dir``, or ``runc ... restore``
    without ``--image-path``: the images the export carries."""
    if from_dir is None or len(command) < 2 or "restore" not in command[1:]:
        return command
    images = from_dir / IMAGES_NAME
    if not images.is_dir() or images.is_symlink():
        return command
    if is_criu_restore(command):
        if any(a in ("-D", "--images-dir") or a.startswith("--images-dir=") for a in command):
            return command
        print(f"snapcore: {command[0]} restore -D {images} (the images the export carries)", flush=True)
        return [*command, "-D", str(images)]
    if os.path.basename(command[0]) == "runc":
        named = ("--image-path", "-image-path")
        if any(a in named or a.startswith(tuple(f"{n}=" for n in named)) for a in command):
            return command
        at = command.index("restore") + 1  # runc takes a command's options before the container id
        print(f"snapcore: {command[0]} restore --image-path {images} (the images the export carries)", flush=True)
        return [*command[:at], "--image-path", str(images), *command[at:]]
    return command


def resettle_tasks(command: list[str], checkpoint_id: str | None) -> None:
    """After a ``criu restore`` that succeeded: the tasks leave the temporary cgroup
    CRIU re-made for them (:func:`snapcore.tasks.freezer.recover_temporary_cgroups`)."""
    if not checkpoint_id or not is_criu_restore(command):
        return
    from snapcore.tasks.freezer import recover_temporary_cgroups

    for group in recover_temporary_cgroups(name=checkpoint_id, leave_frozen=True):
        print(f"snapcore: the restored tasks left {group}, which CRIU re-made, for its parent", flush=True)
