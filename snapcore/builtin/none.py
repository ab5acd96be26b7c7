"""The core's own imager ``none``: no freeze, no image, the live tree for an exporter.

For filesystems that can neither freeze nor snapshot (tmpfs, NFS, FUSE), an exporter
copies the live tree; with tasks frozen and the change watch on, that copy can still
be trusted, so the manifest says ``live-copy``. Never picked by ``auto``.
"""

from __future__ import annotations

from snapcore import hookimpl
from snapcore.types import BackendInfo, Consistency, Image, Mount, Role, Support, Target

NAME = "none"


@hookimpl
def snapcore_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        roles=frozenset({Role.IMAGER}),
        description="no image: an exporter copies the live tree (tmpfs, NFS, FUSE)",
    )


@hookimpl
def snapcore_probe(mount: Mount) -> Support:
    # usable when named, never chosen by 'auto': it promises nothing by itself
    return Support(ok=True, reason="copies the live tree; consistency rests on the frozen tasks", score=0)


@hookimpl
def snapcore_freeze(target: Target) -> None:
    return None


@hookimpl
def snapcore_snapshot(target: Target) -> Image:
    return Image(
        backend=NAME,
        ref=None,
        consistency=Consistency.LIVE_COPY,
        path=target.mount.mount_point,
        live=False,
    )


@hookimpl
def snapcore_thaw(target: Target) -> None:
    return None
