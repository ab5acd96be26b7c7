"""pluggy hooks of the ``tar`` exporter; the work is in :mod:`.tar_export` and :mod:`.tar_restore`."""

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
from snapcore_tar import TAR as NAME

if TYPE_CHECKING:
    from snapcore import Manifest
    from snapcore_tar import common, tar_export, tar_format, tar_restore
else:  # loaded when a target really exports with tar: the CLI starts fast
    common = lazy_import("snapcore_tar.common")
    tar_format = lazy_import("snapcore_tar.tar_format")
    tar_export = lazy_import("snapcore_tar.tar_export")
    tar_restore = lazy_import("snapcore_tar.tar_restore")


def _dest(target: Target) -> Path:
    dest = target.options_for(NAME).get("dest")
    if not dest:
        raise BackendError(
            "no dest: set options.tar.dest to an absolute path", mount=target.mount.mount_point, backend=NAME
        )
    return Path(str(dest))


def _name(target: Target, export: Export) -> str:
    return common.record_slug(export.details, target.mount.mount_point)


log = get_logger(__name__)


@hookimpl
def snapcore_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        roles=frozenset({Role.EXPORTER}),
        description="GNU tar archive per checkpoint (gzip/zstd, --listed-incremental chains), with its manifest",
    )


@hookimpl
def snapcore_option_schema() -> Sequence[Option]:
    return (
        Option(
            name="dest",
            kind=OptionKind.PATH,
            required=True,
            help="directory (on another filesystem) that receives DEST/ID/<mount>.tar*",
        ),
        Option(
            name="compress",
            kind=OptionKind.CHOICE,
            default="none",
            choices=tuple(tar_format.COMPRESSIONS),
            help="compression of the archive",
        ),
        Option(
            name="incremental",
            kind=OptionKind.BOOL,
            default=False,
            help="level 0 then increments (GNU tar --listed-incremental)",
        ),
        Option(
            name="full_every",
            kind=OptionKind.INT,
            default=0,
            help="start a new level-0 archive after this many increments (0: never)",
        ),
    )


@hookimpl
def snapcore_prepare(target: Target, role: Role) -> None:
    if role is Role.EXPORTER:
        tar_export.prepare(target, _dest(target))


@hookimpl
def snapcore_before_freeze(checkpoint: Checkpoint) -> None:
    for target in checkpoint.targets:
        if target.exporter == NAME:  # else common stays unloaded
            common.refuse_dest_on_a_target(NAME, target, _dest(target), checkpoint.targets)


@hookimpl
def snapcore_export(target: Target, image: Image, dest: Path) -> Export:
    return tar_export.export(target, image, dest)


@hookimpl
def snapcore_discard(target: Target, export: Export | None) -> None:
    if export is not None and export.backend == NAME:
        tar_export.discard(target, export)


@hookimpl
def snapcore_discard_partial(target: Target, dest: Path) -> Sequence[str]:
    return tar_export.discard_partial(target, dest)


@hookimpl
def snapcore_verify(target: Target, export: Export | None) -> Sequence[str]:
    if export is None or export.backend != NAME:
        return []
    return tar_restore.verify(export, _name(target, export))


@hookimpl
def snapcore_restore(target: Target, export: Export | None, dest: Path | None, in_place: bool) -> str:
    if export is None:
        raise BackendError("this checkpoint has no tar export to restore", mount=target.mount.mount_point, backend=NAME)
    if in_place or dest is None:
        raise BackendError(
            "a tar export is restored into a new, empty directory (--to DIR), never in place",
            mount=target.mount.mount_point,
            backend=NAME,
        )
    return tar_restore.restore(export, _name(target, export), dest)


@hookimpl
def snapcore_finish(target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
    if export is not None:
        tar_export.finish(target, export)
    return []


@hookimpl
def snapcore_checkpoint_end(checkpoint: Checkpoint, outcome: Outcome, manifest: Manifest) -> None:
    if all(t.exporter != NAME for t in checkpoint.targets):
        return
    common.publish_exports(NAME, checkpoint, outcome, manifest, tar_export.publish)
