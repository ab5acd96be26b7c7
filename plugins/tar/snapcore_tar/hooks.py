"""pluggy hooks of both exporters, ``tar`` and ``rsync``: one class, two instances.

:class:`ExporterHooks` implements the hooks once and delegates the work to an
:class:`Exporter`, the small interface of one backend; :class:`TarExporter` and
:class:`RsyncExporter` hold what differs between the two (name, description,
option schema, how ``dest`` is read, the refusal of an in-place restore) and call
into their modules (:mod:`.tar_export` and :mod:`.tar_restore`,
:mod:`.rsync_export` and :mod:`.rsync_restore`). The entry points name the two
instances, ``snapcore_tar.hooks:tar`` and ``snapcore_tar.hooks:rsync``; pluggy
registers any object with ``@hookimpl`` methods as it registers a module.

The backend modules are loaded when a hook of that backend really runs: the CLI
starts fast (``tests/test_startup.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
    hookimpl,
    lazy_import,
)
from snapcore_tar import RSYNC, TAR

if TYPE_CHECKING:
    from snapcore import Manifest
    from snapcore_tar import common, rsync_dest, rsync_export, rsync_restore, tar_export, tar_format, tar_restore
else:  # loaded when a target really exports with tar or rsync: the CLI starts fast
    common = lazy_import("snapcore_tar.common")
    tar_format = lazy_import("snapcore_tar.tar_format")
    tar_export = lazy_import("snapcore_tar.tar_export")
    tar_restore = lazy_import("snapcore_tar.tar_restore")
    rsync_dest = lazy_import("snapcore_tar.rsync_dest")
    rsync_export = lazy_import("snapcore_tar.rsync_export")
    rsync_restore = lazy_import("snapcore_tar.rsync_restore")


class Exporter(Protocol):
    """What :class:`ExporterHooks` needs of one backend. Only hooks of that backend
    reach it: an export handed over is one of its own."""

    name: str
    description: str
    #: the message of the error refusing ``restore --in-place`` (or without ``--to``)
    in_place_refusal: str

    def options(self) -> Sequence[Option]: ...

    def prepare(self, target: Target) -> None: ...

    def local_dest(self, target: Target) -> Path | None:
        """The directory exports of ``target`` go to, None when it is remote."""
        ...

    def precopy(self, target: Target) -> Sequence[Mapping[str, Any]]:
        """Rounds of copying the live mount before the freeze (none: empty)."""
        ...

    def export(self, target: Target, image: Image, dest: Path) -> Export: ...

    def finish(self, target: Target, export: Export) -> None: ...

    def publish(self, target: Target, export: Export, manifest_text: str) -> None: ...

    def discard(self, target: Target, export: Export) -> None: ...

    def discard_partial(self, target: Target, dest: Path) -> Sequence[str]: ...

    def verify(self, target: Target, export: Export) -> Sequence[str]: ...

    def restore(self, target: Target, export: Export, dest: Path) -> str: ...


class ExporterHooks:
    """The hooks of one exporter, delegating to its :class:`Exporter`."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self.name = exporter.name

    def __repr__(self) -> str:
        return f"<{__name__}:{self.name}>"

    @hookimpl
    def snapcore_backend_info(self) -> BackendInfo:
        return BackendInfo(name=self.name, roles=frozenset({Role.EXPORTER}), description=self.exporter.description)

    @hookimpl
    def snapcore_option_schema(self) -> Sequence[Option]:
        return self.exporter.options()

    @hookimpl
    def snapcore_prepare(self, target: Target, role: Role) -> None:
        if role is Role.EXPORTER:
            self.exporter.prepare(target)

    @hookimpl
    def snapcore_before_freeze(self, checkpoint: Checkpoint) -> None:
        for target in checkpoint.targets:
            if target.exporter == self.name:  # else common stays unloaded
                dest = self.exporter.local_dest(target)
                if dest is not None:  # a remote dest is on no filesystem of ours
                    common.refuse_dest_on_a_target(self.name, target, dest, checkpoint.targets)

    @hookimpl
    def snapcore_precopy(self, target: Target, dest: Path) -> Sequence[Mapping[str, Any]]:
        return self.exporter.precopy(target)

    @hookimpl
    def snapcore_export(self, target: Target, image: Image, dest: Path) -> Export:
        return self.exporter.export(target, image, dest)

    @hookimpl
    def snapcore_discard(self, target: Target, export: Export | None) -> None:
        if export is not None and export.backend == self.name:
            self.exporter.discard(target, export)

    @hookimpl
    def snapcore_discard_partial(self, target: Target, dest: Path) -> Sequence[str]:
        return self.exporter.discard_partial(target, dest)

    @hookimpl
    def snapcore_verify(self, target: Target, export: Export | None) -> Sequence[str]:
        if export is None or export.backend != self.name:
            return []
        return self.exporter.verify(target, export)

    @hookimpl
    def snapcore_restore(self, target: Target, export: Export | None, dest: Path | None, in_place: bool) -> str:
        where = target.mount.mount_point
        if export is None:
            raise BackendError(f"this checkpoint has no {self.name} export to restore", mount=where, backend=self.name)
        if in_place or dest is None:
            raise BackendError(self.exporter.in_place_refusal, mount=where, backend=self.name)
        return self.exporter.restore(target, export, dest)

    @hookimpl
    def snapcore_finish(self, target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
        if export is not None:
            self.exporter.finish(target, export)
        return []

    @hookimpl
    def snapcore_checkpoint_end(self, checkpoint: Checkpoint, outcome: Outcome, manifest: Manifest) -> None:
        if all(t.exporter != self.name for t in checkpoint.targets):
            return
        common.publish_exports(self.name, checkpoint, outcome, manifest, self.exporter.publish)


def _slug(target: Target, export: Export) -> str:
    return common.record_slug(export.details, target.mount.mount_point)


class TarExporter:
    """``tar``: archives in the directory ``options.tar.dest``, the core's ``dest``."""

    name = TAR
    description = "GNU tar archive per checkpoint (gzip/zstd, --listed-incremental chains), with its manifest"
    in_place_refusal = "a tar export is restored into a new, empty directory (--to DIR), never in place"

    def precopy(self, target: Target) -> Sequence[Mapping[str, Any]]:
        # no pre-copy: an archive written before the freeze cannot be completed by
        # the one written in it (README: "Pre-copy")
        return ()

    def options(self) -> Sequence[Option]:
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

    def local_dest(self, target: Target) -> Path:
        dest = target.options_for(self.name).get("dest")
        if not dest:
            raise BackendError(
                "no dest: set options.tar.dest to an absolute path", mount=target.mount.mount_point, backend=self.name
            )
        return Path(str(dest))

    def prepare(self, target: Target) -> None:
        tar_export.prepare(target, self.local_dest(target))

    def export(self, target: Target, image: Image, dest: Path) -> Export:
        return tar_export.export(target, image, dest)

    def finish(self, target: Target, export: Export) -> None:
        tar_export.finish(target, export)

    def publish(self, target: Target, export: Export, manifest_text: str) -> None:
        tar_export.publish(target, export, manifest_text)

    def discard(self, target: Target, export: Export) -> None:
        tar_export.discard(target, export)

    def discard_partial(self, target: Target, dest: Path) -> Sequence[str]:
        return tar_export.discard_partial(target, dest)

    def verify(self, target: Target, export: Export) -> Sequence[str]:
        return tar_restore.verify(export, _slug(target, export))

    def restore(self, target: Target, export: Export, dest: Path) -> str:
        return tar_restore.restore(export, _slug(target, export), dest)


class RsyncExporter:
    """``rsync``: trees in ``options.rsync.dest``, a path or an rsync daemon or ssh
    URL, which the backend reads itself: the core's ``dest`` (a Path) would mangle
    a URL."""

    name = RSYNC
    description = (
        "rsync tree per checkpoint, unchanged files hard-linked to the last (--link-dest); local, rsync daemon or ssh"
    )
    in_place_refusal = "an rsync export is restored into a new, empty directory (--to DIR), never in place"

    def options(self) -> Sequence[Option]:
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
            Option(
                name="precopy",
                kind=OptionKind.INT,
                default=0,
                help="copy the live tree before the freeze, in up to this many rounds (0: no pre-copy); "
                "the export then moves only what changed since",
            ),
            Option(
                name="precopy_until",
                kind=OptionKind.STR,
                default="1%",
                help="stop the pre-copy once a round (after the first) moves no more than this: N% of the "
                "tree's size, or a size (64M)",
            ),
        )

    def local_dest(self, target: Target) -> Path | None:
        return rsync_dest.local_dest(target)

    def precopy(self, target: Target) -> Sequence[Mapping[str, Any]]:
        return rsync_export.precopy(target)

    def prepare(self, target: Target) -> None:
        rsync_export.prepare(target)

    def export(self, target: Target, image: Image, dest: Path) -> Export:
        # the dest option may be a URL, which a Path would mangle: read the option itself
        return rsync_export.export(target, image)

    def finish(self, target: Target, export: Export) -> None:
        rsync_export.finish(target, export)

    def publish(self, target: Target, export: Export, manifest_text: str) -> None:
        rsync_export.publish(target, export, manifest_text)

    def discard(self, target: Target, export: Export) -> None:
        rsync_export.discard(target, export)

    def discard_partial(self, target: Target, dest: Path) -> Sequence[str]:
        return rsync_export.discard_partial(target)

    def verify(self, target: Target, export: Export) -> Sequence[str]:
        return rsync_restore.verify(target, export)

    def restore(self, target: Target, export: Export, dest: Path) -> str:
        return rsync_restore.restore(target, export, dest)


class RsyncHooks(ExporterHooks):
    """rsync's hooks: those of both exporters, and what travels beside a remote tree
    (CRIU's images, the destination's answer to a hand-off); the core does it for a
    local one, as for a tar export."""

    @hookimpl
    def snapcore_export_put(
        self, target: Target, export: Export, parts: Mapping[str, Path]
    ) -> Mapping[str, Any] | None:
        return rsync_export.put(target, export, parts)

    @hookimpl
    def snapcore_export_get(self, target: Target, export: Export, name: str, limit: int) -> bytes | None:
        return rsync_export.get(target, export, name, limit)


#: The plugins the entry points name (``tar = "snapcore_tar.hooks:tar"``).
tar = ExporterHooks(TarExporter())
rsync = RsyncHooks(RsyncExporter())
