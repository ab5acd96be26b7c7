"""pluggy hooks of the ``rsync`` exporter; the work is in :mod:`.rsync_export` and :mod:`.rsync_restore`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from snapcore import (
    BackendError,
    BackendInfo,
    Checkpoint,
    Export,
    Image,
    Option,
    OptionKind,
    Outcome,
    Role,
    Target,
    get_logger,
    hookimpl,
    lazy_import,
)
from snapcore_tar import RSYNC as NAME

if TYPE_CHECKING:
    from snapcore import Manifest
    from snapcore_tar import common, rsync_dest, rsync_export, rsync_restore
else:  # loaded when a target really exports with rsync: the CLI starts fast
    common = lazy_import("snapcore_tar.common")
    rsync_dest = lazy_import("snapcore_tar.rsync_dest")
    rsync_export = lazy_import("snapcore_tar.rsync_export")
    rsync_restore = lazy_import("snapcore_tar.rsync_restore")

log = get_logger(__name__)


@hookimpl
def snapcore_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        roles=frozenset({Role.EXPORTER}),
        description="rsync tree per checkpoint, unchanged files hard-linked to the last (--link-dest); "
        "local, rsync daemon or ssh",
    )


@hookimpl
def snapcore_option_schema() -> Sequence[Option]:
    return (
        Option(
            name="dest",
            kind=OptionKind.STR,
            required=True,
            help="absolute path, rsync://HOST[:PORT]/MODULE[/PATH], HOST::MODULE[/PATH] or [USER@]HOST:PATH",
        ),
        Option(name="rsh", kind=OptionKind.STR, default=None, help="remote shell for an ssh dest (rsync -e)"),
        Option(
            name="password_file",
            kind=OptionKind.STR,
            default=None,
            help="rsync daemon password file (rsync --password-file)",
        ),
        Option(
            name="timeout",
            kind=OptionKind.DURATION,
            default=30.0,
            help="give up on an unreachable or silent destination after this long",
        ),
    )


@hookimpl
def snapcore_prepare(target: Target, role: Role) -> None:
    if role is Role.EXPORTER:
        rsync_export.prepare(target)


@hookimpl
def snapcore_before_freeze(checkpoint: Checkpoint) -> None:
    for target in checkpoint.targets:
        if target.exporter == NAME:  # else common stays unloaded
            dest = rsync_dest.local_dest(target)
            if dest is not None:  # a remote dest is on no filesystem of ours
                common.refuse_dest_on_a_target(NAME, target, dest, checkpoint.targets)


@hookimpl
def snapcore_export(target: Target, image: Image, dest: Path) -> Export:
    # the dest option may be a URL, which a Path would mangle: read the option itself
    return rsync_export.export(target, image)


@hookimpl
def snapcore_discard(target: Target, export: Export | None) -> None:
    if export is not None and export.backend == NAME:
        rsync_export.discard(target, export)


@hookimpl
def snapcore_discard_partial(target: Target, dest: Path) -> Sequence[str]:
    return rsync_export.discard_partial(target)


@hookimpl
def snapcore_verify(target: Target, export: Export | None) -> Sequence[str]:
    if export is None or export.backend != NAME:
        return []
    return rsync_restore.verify(target, export)


@hookimpl
def snapcore_restore(target: Target, export: Export | None, dest: Path | None, in_place: bool) -> str:
    if export is None:
        raise BackendError(
            "this checkpoint has no rsync export to restore", mount=target.mount.mount_point, backend=NAME
        )
    if in_place or dest is None:
        raise BackendError(
            "an rsync export is restored into a new, empty directory (--to DIR), never in place",
            mount=target.mount.mount_point,
            backend=NAME,
        )
    return rsync_restore.restore(target, export, dest)


@hookimpl
def snapcore_finish(target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
    if export is not None:
        rsync_export.finish(target, export)
    return []


@hookimpl
def snapcore_checkpoint_end(checkpoint: Checkpoint, outcome: Outcome, manifest: Manifest) -> None:
    if all(t.exporter != NAME for t in checkpoint.targets):
        return
    common.publish_exports(NAME, checkpoint, outcome, manifest, rsync_export.publish)
