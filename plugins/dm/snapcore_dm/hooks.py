"""pluggy hooks of the ``dm`` backend; the work is in :mod:`.backend` (probe,
snapshot, health, mount), :mod:`.restore` (discard, list, restore) and
:mod:`.devices` (the tools, the devices, LVM).

Life of a dm image in a checkpoint:

* ``prepare``: classify the device, check room (free extents, pool room, a COW
  device) and build the ``lvcreate``/``dmsetup`` command; ``syncfs`` the mount.
* ``freeze``: nothing. The kernel freezes the filesystem itself while it suspends
  the origin for the snapshot (dm lockfs); a FIFREEZE first would make that
  suspend fail (a double freeze), and would hold writers longer for nothing.
* ``snapshot``: one ``lvcreate -s`` (or the dmsetup sequence), inside the window.
* ``after_thaw``: mount each snapshot read-only for its exporter (outside the
  window), at ``image.path``.
* ``checkpoint_end``: COW health into the manifest (warning past ``warn_percent``),
  then unmount. ``discard`` unmounts and deletes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore import (
    BackendError,
    BackendInfo,
    Checkpoint,
    Consistency,
    Export,
    Image,
    ImageEntry,
    Mount,
    Option,
    OptionKind,
    Outcome,
    Rescue,
    RescueKind,
    Role,
    Support,
    Target,
    block_devnum,
    get_logger,
    hookimpl,
    lazy_import,
    syncfs,
)
from snapcore_dm import NAME

if TYPE_CHECKING:
    from snapcore import Manifest
    from snapcore_dm import backend, devices, restore
else:  # LVM and udev are loaded when a dm mount is really met: the CLI starts fast
    backend = lazy_import("snapcore_dm.backend")
    devices = lazy_import("snapcore_dm.devices")
    restore = lazy_import("snapcore_dm.restore")
log = get_logger(__name__)


def _warn_percent(target: Target) -> float:
    return float(target.options_for(NAME).get("warn_percent") or 80)


@hookimpl
def snapcore_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NAME,
        roles=frozenset({Role.IMAGER}),
        description="device-mapper snapshots: LVM thick and thin LVs (lvcreate -s), raw dm (dmsetup)",
    )


@hookimpl
def snapcore_option_schema() -> Sequence[Option]:
    return (
        Option(
            name="size",
            kind=OptionKind.STR,
            default="20%ORIGIN",
            help="COW size of a thick LVM snapshot, in lvcreate syntax (20%ORIGIN, 512M, 1G); thin ones take none",
        ),
        Option(
            name="cow_device",
            kind=OptionKind.PATH,
            help="raw dm devices only: a spare block device for the snapshot's COW (it is overwritten)",
        ),
        Option(
            name="warn_percent",
            kind=OptionKind.INT,
            default=80,
            help="warn in the manifest (and in list) when the COW, or the thin pool, is this full",
        ),
        Option(
            name="mount",
            kind=OptionKind.BOOL,
            default=False,
            help="mount the snapshot read-only for the payload even without an exporter",
        ),
    )


@hookimpl
def snapcore_probe(mount: Mount) -> Support:
    if not _maybe_dm(mount):
        return Support.no(f"{mount.source} is not a device-mapper device")
    return backend.probe(mount)


def _maybe_dm(mount: Mount) -> bool:
    """False when sysfs says the mount's device is no dm device (a cheap test
    that spares loading the backend for every other mount)."""
    devnum = block_devnum(mount)
    return devnum is not None and os.path.exists(f"/sys/dev/block/{os.major(devnum)}:{os.minor(devnum)}/dm")


@hookimpl
def snapcore_prepare(target: Target, role: Role) -> None:
    if role is not Role.IMAGER:
        return
    where = target.mount.mount_point
    plan = backend.plan(target.mount, target.checkpoint_id, target.options_for(NAME))
    try:
        syncfs(where)
    except OSError as exc:
        raise BackendError(f"syncfs failed: {exc.strerror}", mount=where, backend=NAME) from exc
    target.state_of(NAME)["plan"] = plan  # for rescue and snapshot


@hookimpl
def snapcore_rescue(target: Target) -> Rescue:
    """If the controller dies while ``lvcreate``/``dmsetup`` holds the origin
    suspended (and so its filesystem frozen), the guard resumes it; resuming a
    device that is not suspended does nothing."""
    plan = target.state_of(NAME).get("plan")
    name = plan.source.device.name if plan is not None else target.mount.dm_name
    if not name:
        raise BackendError("no device-mapper name to resume", mount=target.mount.mount_point, backend=NAME)
    return Rescue(kind=RescueKind.COMMAND, argv=("dmsetup", "resume", name))


@hookimpl
def snapcore_freeze(target: Target) -> None:
    # deliberately nothing: the dm suspend inside snapshot() freezes the filesystem
    return None


@hookimpl
def snapcore_snapshot(target: Target) -> Image:
    where = target.mount.mount_point
    plan = target.state_of(NAME).pop("plan", None)
    if plan is None:  # prepare was skipped (an API caller): plan now, inside the window
        plan = backend.plan(target.mount, target.checkpoint_id, target.options_for(NAME))
    details: dict[str, Any] = backend.snapshot(plan, mount=where)
    details["fstype"] = target.mount.fstype
    details["frozen_by"] = "dm suspend (lockfs)"
    path = None
    if target.exporter or target.options_for(NAME).get("mount"):
        path = str(backend.image_mount_dir(target.checkpoint_id, where))
    ref = f"{details['vg']}/{details['lv']}" if details["kind"] != "raw" else f"dm:{details['dm_name']}"
    image = Image(
        backend=NAME,
        ref=ref,
        # the kernel froze the filesystem while suspending the origin: a clean
        # filesystem at one instant of the window
        consistency=Consistency.ATOMIC,
        path=path,
        details=details,
    )
    target.state_of(NAME)["made"] = backend.Made(target=target, image=image)  # mounted after the thaw
    return image


@hookimpl
def snapcore_thaw(target: Target) -> None:
    # the origin was resumed by lvcreate/dmsetup before snapshot() returned
    return None


@hookimpl
def snapcore_after_thaw(checkpoint: Checkpoint) -> None:
    """Mount this checkpoint's snapshots read-only for the exporters (outside the window)."""
    errors = []
    for entry in _made(checkpoint):
        if entry.image.path is None or entry.mounted:
            continue
        try:
            backend.mount_image(entry.image.details, entry.target.mount.fstype, Path(entry.image.path))
            entry.mounted = True
        except BackendError as exc:
            errors.append(f"{entry.target.mount.mount_point}: {exc}")
    if errors:
        raise BackendError("cannot mount the snapshot for export: " + "; ".join(errors), backend=NAME)


def _made(checkpoint: Checkpoint) -> list[backend.Made]:
    """The snapshots this checkpoint made (and has not discarded)."""
    found = (t.state_of(NAME).get("made") for t in checkpoint.targets)
    return [m for m in found if m is not None]


@hookimpl
def snapcore_discard(target: Target, image: Image | None, export: Export | None) -> None:
    if export is not None or image is None:
        return
    details: Mapping[str, Any] = image.details
    if not details.get("kind") and image.ref:  # found by listing (recover): the ref says it all
        details = restore.details_from_ref(image.ref, devices.dm_device_of_mount(target.mount))
    # the image may be mounted for an exporter: at its path, or (a controller that
    # died before journaling it) where this checkpoint would have mounted it
    where = image.path or str(backend.image_mount_dir(target.checkpoint_id, target.mount.mount_point))
    backend.unmount_image(Path(where))
    restore.discard(details)
    made = target.state_of(NAME).get("made")
    if made is not None and made.image.ref == image.ref:
        del target.state_of(NAME)["made"]


@hookimpl
def snapcore_finish(target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
    """COW health once the exports are done, into the manifest before it is written."""
    if export is not None or image is None:
        return []
    state = backend.health(image.details)
    problems = state.problems(_warn_percent(target))
    if not state.exists or not state.valid:
        # an invalid snapshot is no image: the checkpoint fails rather than call it good
        raise BackendError(problems[0], mount=target.mount.mount_point, backend=NAME)
    return [f"dm snapshot {image.ref}: {problem}" for problem in problems]


@hookimpl
def snapcore_checkpoint_end(checkpoint: Checkpoint, outcome: Outcome, manifest: Manifest) -> None:
    """Unmount the snapshots mounted for the exporters."""
    made = _made(checkpoint)
    for target in checkpoint.targets:
        target.state_of(NAME).clear()
    for entry in made:
        if entry.image.path:
            backend.unmount_image(Path(entry.image.path))


@hookimpl
def snapcore_verify(target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
    if export is not None or image is None:
        return []
    # only what makes the image unusable; a COW filling up is shown by list
    return backend.health(image.details).problems(None)


@hookimpl
def snapcore_list_images(mount: Mount) -> Sequence[ImageEntry]:
    if not _maybe_dm(mount):
        return []
    dev = devices.dm_device_of_mount(mount)
    if dev is None:
        return []
    entries = []
    if dev.is_lvm:
        for lv in restore.list_lvm(dev):
            details = {"kind": "thin" if lv.thin else "thick", "vg": lv.vg, "lv": lv.name, "pool": lv.pool}
            entries.append(
                ImageEntry(
                    backend=NAME,
                    ref=lv.ref,
                    checkpoint_id=lv.checkpoint_id,
                    created=lv.created,
                    problems=tuple(backend.health(details).problems(80.0)),
                )
            )
        return entries
    for name in restore.raw_snapshots_of(dev.name):
        checkpoint_id = name.rsplit("-snapcore-", 1)[-1] if "-snapcore-" in name else None
        state = backend.health({"kind": "raw", "dm_name": name})
        entries.append(
            ImageEntry(
                backend=NAME,
                ref=f"dm:{name}",
                checkpoint_id=checkpoint_id,
                problems=tuple(state.problems(80.0)),
            )
        )
    return entries


@hookimpl
def snapcore_restore(
    target: Target, image: Image | None, export: Export | None, dest: Path | None, in_place: bool
) -> str:
    if image is None:
        raise BackendError("no dm image to restore from", mount=target.mount.mount_point, backend=NAME)
    problems = backend.health(image.details).problems(None)
    if problems:
        raise BackendError(f"{image.ref}: {'; '.join(problems)}", mount=target.mount.mount_point, backend=NAME)
    if in_place:
        return restore.restore_in_place(image.details, target.mount)
    if dest is None:
        raise BackendError("restore needs a destination or in_place", backend=NAME)
    from tempfile import mkdtemp

    where = Path(mkdtemp(prefix="restore-", dir=_ensure(backend.run_dir())))
    try:
        backend.mount_image(image.details, str(image.details.get("fstype") or target.mount.fstype), where)
        restore.copy_tree(where, dest)
    finally:
        with contextlib.suppress(BackendError):
            backend.unmount_image(where)
    return f"copied {image.ref} into {dest}"


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
