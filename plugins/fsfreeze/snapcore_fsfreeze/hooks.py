"""pluggy hooks of the ``fsfreeze`` backend; the work is in :mod:`.backend`."""

from __future__ import annotations

import os
from collections.abc import Sequence

from snapcore import (
    BackendError,
    BackendInfo,
    Consistency,
    Image,
    Mount,
    Option,
    OptionKind,
    Rescue,
    RescueKind,
    Role,
    Support,
    Target,
    hookimpl,
    syncfs,
)
from snapcore_fsfreeze.backend import Freezer, freezable

NAME = "fsfreeze"


def _freezer(target: Target) -> Freezer:
    """The target's own freezer: it holds the descriptor FITHAW needs until the thaw."""
    state = target.state_of(NAME)
    freezer = state.get("freezer")
    if freezer is None:
        freezer = state["freezer"] = Freezer()
    return freezer


@hookimpl
def snapcore_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        roles=frozenset({Role.IMAGER}),
        description="FIFREEZE/FITHAW: holds the live filesystem frozen while an exporter copies it",
        live_image=True,
    )


@hookimpl
def snapcore_option_schema() -> Sequence[Option]:
    return (
        Option(
            name="sync",
            kind=OptionKind.BOOL,
            default=True,
            help="syncfs in prepare, so the freeze itself is short",
        ),
    )


@hookimpl
def snapcore_probe(mount: Mount) -> Support:
    ok, reason = freezable(mount)
    # low score: a real snapshot (btrfs, dm) keeps an image without holding writers
    return Support.yes(reason, score=20) if ok else Support.no(reason)


@hookimpl
def snapcore_prepare(target: Target, role: Role) -> None:
    ok, reason = freezable(target.mount)
    if not ok:
        raise BackendError(reason, mount=target.mount.mount_point, backend=NAME)
    if target.options_for(NAME).get("sync", True):
        try:
            syncfs(target.mount.mount_point)
        except OSError as exc:
            raise BackendError(f"syncfs failed: {exc.strerror}", mount=target.mount.mount_point, backend=NAME) from exc


@hookimpl
def snapcore_rescue(target: Target) -> Rescue:
    return Rescue(kind=RescueKind.FITHAW, path=target.mount.mount_point)


@hookimpl
def snapcore_freeze(target: Target) -> None:
    _freezer(target).freeze(target.mount.mount_point, target.mount.mount_point)


@hookimpl
def snapcore_snapshot(target: Target) -> Image:
    return Image(
        backend=NAME,
        ref=None,
        consistency=Consistency.FS_FROZEN,
        path=target.mount.mount_point,
        live=True,
        details={"pid": os.getpid()},
    )


@hookimpl
def snapcore_thaw(target: Target) -> None:
    _freezer(target).thaw(target.mount.mount_point)


@hookimpl
def snapcore_discard(target: Target) -> None:
    # the image is the live filesystem: there is nothing to delete
    return None
