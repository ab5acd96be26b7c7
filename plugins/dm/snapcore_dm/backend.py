"""device-mapper snapshots: LVM thick and thin logical volumes, and raw dm devices.

Making a snapshot, and reading and mounting the one made. Testable without pluggy:
:mod:`snapcore_dm.hooks` only calls into here, :mod:`.restore` (discard, list,
restore) and :mod:`.devices` (the tools, the devices, LVM's view of them).

* **LVM thick** (``linear``/``striped`` LVs): ``lvcreate -s`` with a COW of
  ``options.size`` (``20%ORIGIN``, ``1G``) taken from the VG's free extents.
* **LVM thin**: ``lvcreate -s`` without a size; the room is the pool's.
* **raw dm** (not LVM): the origin's table moves to ``NAME-sc-real``, the origin is
  reloaded as ``snapshot-origin`` of it and a ``snapshot`` target is stacked on a
  COW device the admin names (``options.cow_device``) — what LVM does internally.

The kernel freezes the filesystem itself while it suspends the origin for the
snapshot (dm "lockfs"), so this backend never FIFREEZEs: a second freeze would make
the suspend fail with EBUSY. The image is a clean filesystem at the suspend instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore import (
    BackendError,
    Image,
    MissingTool,
    Mount,
    Support,
    Target,
    ToolFailed,
    default_run_dir,
    human_bytes,
)
from snapcore_dm import NAME
from snapcore_dm.devices import (
    LV,
    RAW_REAL_UUID,
    RAW_UUID,
    TAG,
    TAG_CHECKPOINT,
    DmDevice,
    dm_device_by_name,
    dm_device_of_mount,
    dm_escape,
    find_lv,
    lvm_names,
    pick,
    run,
    size_args,
    snapshot_size_bytes,
    vg_lvs,
)

#: LV segment types whose volumes can take a thick snapshot.
THICK_SEGTYPES = frozenset({"linear", "striped"})
#: dm target types a raw snapshot-origin can stack on (the table moves unchanged).
RAW_TARGETS = frozenset({"linear", "striped", "crypt", "snapshot-origin"})
#: A thin pool (data or metadata) this full is refused: the snapshot would fill it.
THIN_FULL_PERCENT = 95.0
#: dm snapshot chunk size in 512-byte sectors (LVM's default, 4 KiB).
RAW_CHUNK_SECTORS = 8

#: How the snapshot is mounted read-only for exporters: no journal replay, and for
#: xfs no uuid clash with its mounted origin.
MOUNT_OPTIONS = {
    "ext4": "ro,noload",
    "ext3": "ro,noload",
    "ext2": "ro",
    "xfs": "ro,nouuid,norecovery",
}


# -- probe -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """What a mount's device is, for this backend."""

    kind: str  # "thick" | "thin" | "raw"
    device: DmDevice
    lv: LV | None = None
    #: Every LV of its VG when it was classified (LVM only): one ``lvs`` answers
    #: for the origin, its pool and a clashing snapshot name (~0.3 s each emulated)
    siblings: tuple[LV, ...] = ()
    #: The raw origin's dm table (raw only).
    table: str = ""


def probe(mount: Mount) -> Support:
    dev = dm_device_of_mount(mount)
    if dev is None:
        return Support.no(f"{mount.source} is not a device-mapper device")
    if dev.is_ours:
        return Support.no(f"{dev.name} is a snapshot snapcore made")
    try:
        source = classify(dev, mount=mount.mount_point)
    except MissingTool as exc:
        return Support.no(str(exc))
    except (BackendError, ValueError) as exc:
        return Support.no(str(exc))
    if source.kind == "thick":
        assert source.lv is not None
        return Support.yes(
            f"LVM thick LV {source.lv.ref}: snapshot COW from {human_bytes(source.lv.vg_free)} "
            f"free in VG {source.lv.vg}",
            score=60,
        )
    if source.kind == "thin":
        assert source.lv is not None
        return Support.yes(f"LVM thin LV {source.lv.ref}: thin snapshot in pool {source.lv.pool}", score=65)
    return Support.yes(
        f"raw dm device {dev.name}: snapshot-origin + snapshot on the COW device named by options.cow_device",
        score=40,
    )


def classify(dev: DmDevice, *, mount: str | None = None) -> Source:
    """Say what kind of source ``dev`` is, or raise :class:`BackendError` saying why not."""
    if dev.is_lvm:
        vg, name = lvm_names(dev)
        siblings = tuple(vg_lvs(vg, mount=mount))
        lv = pick(siblings, name)
        if lv is None:
            raise BackendError(f"LVM does not know {vg}/{name}", mount=mount, backend=NAME)
        if lv.is_snapshot:
            raise BackendError(f"{lv.ref} is itself a snapshot: snapshot its origin", mount=mount, backend=NAME)
        if not lv.active:
            raise BackendError(f"{lv.ref} is not active (lvchange -ay {lv.ref})", mount=mount, backend=NAME)
        if lv.thin:
            pool = pick(siblings, lv.pool)
            if pool is None:
                raise BackendError(f"thin pool {lv.vg}/{lv.pool} not found", mount=mount, backend=NAME)
            check_pool(pool, mount=mount)
            return Source(kind="thin", device=dev, lv=lv, siblings=siblings)
        if lv.segtype not in THICK_SEGTYPES:
            raise BackendError(
                f"{lv.ref} is a {lv.segtype} LV: snapshots work on linear, striped and thin LVs",
                mount=mount,
                backend=NAME,
            )
        if lv.vg_free < lv.extent_size or lv.vg_free == 0:
            raise BackendError(
                f"VG {lv.vg} has no free extents for a snapshot of {lv.ref} (vgextend it, or use a thin LV)",
                mount=mount,
                backend=NAME,
            )
        return Source(kind="thick", device=dev, lv=lv, siblings=siblings)
    table = run("dmsetup", "table", dev.name, mount=mount).strip()
    types = {line.split()[2] for line in table.splitlines() if len(line.split()) > 2}
    if not types:
        raise BackendError(f"dm device {dev.name} has no table", mount=mount, backend=NAME)
    bad = types - RAW_TARGETS
    if bad:
        raise BackendError(
            f"dm device {dev.name} is a {', '.join(sorted(bad))} target: a raw snapshot stacks only on "
            f"{', '.join(sorted(RAW_TARGETS))}",
            mount=mount,
            backend=NAME,
        )
    return Source(kind="raw", device=dev, table=table)


def check_pool(pool: LV, *, mount: str | None = None) -> None:
    for what, pct in (("data", pool.data_percent), ("metadata", pool.metadata_percent)):
        if pct is not None and pct >= THIN_FULL_PERCENT:
            raise BackendError(
                f"thin pool {pool.ref} {what} is {pct:.1f}% full (refused at {THIN_FULL_PERCENT:g}%): "
                f"extend it (lvextend {'--poolmetadatasize +…' if what == 'metadata' else '-L +…'} {pool.ref})",
                mount=mount,
                backend=NAME,
            )
    if len(pool.attr) > 8 and pool.attr[8] in "FDM":
        state = {"F": "failed", "D": "out of data space", "M": "read-only metadata"}[pool.attr[8]]
        raise BackendError(f"thin pool {pool.ref} is {state}", mount=mount, backend=NAME)


# -- prepare / snapshot --------------------------------------------------------------


def snapshot_name(origin: str, checkpoint_id: str) -> str:
    """``ORIGIN-snapcore-ID``, shortened with a hash to fit LVM's and dm's 127 chars."""
    name = f"{origin}-snapcore-{checkpoint_id}"
    if len(name) > 100:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{origin[:40]}-snapcore-{digest}"
    return name


@dataclass(slots=True)
class Made:
    """A snapshot this process made, kept until its checkpoint ends (to mount it for
    the exporters, and unmount it again). Here, not in the hooks: its class is built
    when a dm mount is really met, not at every start of the command."""

    target: Target
    image: Image
    mounted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What ``prepare`` decided, so that ``snapshot`` (inside the window) only acts."""

    source: Source
    name: str
    argv: tuple[str, ...]
    cow_device: str | None = None


def plan(mount: Mount, checkpoint_id: str, options: Mapping[str, Any]) -> Plan:
    """Check everything a snapshot of ``mount`` needs; raise saying why it cannot."""
    where = mount.mount_point
    dev = dm_device_of_mount(mount)
    if dev is None:
        raise BackendError(f"{mount.source} is not a device-mapper device", mount=where, backend=NAME)
    source = classify(dev, mount=where)
    tags = ("--addtag", TAG, "--addtag", f"{TAG_CHECKPOINT}{checkpoint_id}")
    if source.kind in ("thick", "thin"):
        lv = source.lv
        assert lv is not None
        name = snapshot_name(lv.name, checkpoint_id)
        if pick(source.siblings, name) is not None:
            raise BackendError(f"{lv.vg}/{name} already exists", mount=where, backend=NAME)
        if source.kind == "thin":
            # -kn: a thin snapshot skips activation by default; exporters need it active
            argv: tuple[str, ...] = ("lvcreate", "-q", "-s", "-kn", "-n", name, *tags, lv.ref)
        else:
            size = str(options.get("size") or "20%ORIGIN")
            try:
                needed = snapshot_size_bytes(size, lv)
            except ValueError as exc:
                raise BackendError(str(exc), mount=where, backend=NAME) from None
            if needed > lv.vg_free:
                raise BackendError(
                    f"a {size} snapshot of {lv.ref} needs {human_bytes(needed)} but VG {lv.vg} has "
                    f"{human_bytes(lv.vg_free)} free (vgextend {lv.vg}, or set options.dm.size lower)",
                    mount=where,
                    backend=NAME,
                )
            argv = ("lvcreate", "-q", "-s", "-n", name, *size_args(size), *tags, lv.ref)
        return Plan(source=source, name=name, argv=argv)
    cow = options.get("cow_device")
    if not cow:
        raise BackendError(
            f"{dev.name} is a raw dm device: name a spare block device for the snapshot's COW "
            "in options.dm.cow_device (it is overwritten)",
            mount=where,
            backend=NAME,
        )
    check_cow_device(str(cow), dev, mount=where)
    return Plan(source=source, name=snapshot_name(dev.name, checkpoint_id), argv=(), cow_device=str(cow))


def check_cow_device(cow: str, origin: DmDevice, *, mount: str) -> None:
    import stat

    try:
        st = os.stat(cow)
    except OSError as exc:
        raise BackendError(f"cow_device {cow}: {exc.strerror}", mount=mount, backend=NAME) from None
    if not stat.S_ISBLK(st.st_mode):
        raise BackendError(f"cow_device {cow} is not a block device", mount=mount, backend=NAME)
    if st.st_rdev == os.makedev(origin.major, origin.minor):
        raise BackendError(f"cow_device {cow} is the origin itself", mount=mount, backend=NAME)
    try:  # O_EXCL on a block device: fails when it is mounted or held by dm
        fd = os.open(cow, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"cow_device {cow} is in use ({exc.strerror})", mount=mount, backend=NAME) from None
    try:
        # a persistent COW starts with an empty header; zero its first chunk now,
        # outside the freeze window
        os.pwrite(fd, b"\0" * 4096, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(plan: Plan, *, mount: str) -> dict[str, Any]:
    """Make the snapshot (inside the freeze window); returns the image's details."""
    source = plan.source
    if source.kind in ("thick", "thin"):
        lv = source.lv
        assert lv is not None
        run("lvm", *plan.argv, mount=mount)
        return {
            "kind": source.kind,
            "vg": lv.vg,
            "lv": plan.name,
            "origin": lv.name,
            "dm_name": f"{dm_escape(lv.vg)}-{dm_escape(plan.name)}",
            "origin_size": lv.size,
            "pool": lv.pool or None,
        }
    assert plan.cow_device is not None
    return raw_snapshot(source, plan.name, plan.cow_device, mount=mount)


def raw_real_name(origin: str) -> str:
    return f"{origin}-sc-real"


def raw_snapshot(source: Source, name: str, cow: str, *, mount: str) -> dict[str, Any]:
    """Stack a dm ``snapshot`` on a raw origin, the way LVM does it.

    The origin's table moves to ``ORIGIN-sc-real`` (unless an earlier snapshot
    already did that), the origin is reloaded as ``snapshot-origin`` of it, then
    suspended (the kernel freezes the filesystem), the snapshot is created, and the
    origin resumed with its new table.
    """
    dev = source.device
    sectors = dev.size // 512
    real = raw_real_name(dev.name)
    made_real = False
    first = source.table.split()
    if first[2] == "snapshot-origin":
        real_dev = first[3]
    else:
        run("dmsetup", "create", real, "-u", f"{RAW_REAL_UUID}{dev.name}"[:128], stdin=source.table + "\n", mount=mount)
        made_real = True
        real_info = dm_device_by_name(real)
        assert real_info is not None
        real_dev = f"{real_info.major}:{real_info.minor}"
        run("dmsetup", "reload", dev.name, "--table", f"0 {sectors} snapshot-origin {real_dev}", mount=mount)
    suspended = False
    created = False
    try:
        run("dmsetup", "suspend", dev.name, mount=mount)  # lockfs: the kernel freezes the fs
        suspended = True
        run(
            "dmsetup",
            "create",
            name,
            "-u",
            f"{RAW_UUID}{name}"[:128],
            "--table",
            f"0 {sectors} snapshot {real_dev} {cow} P {RAW_CHUNK_SECTORS}",
            mount=mount,
        )
        created = True
        run("dmsetup", "resume", dev.name, mount=mount)
        suspended = False
    except BaseException:
        with contextlib.suppress(BackendError):
            if created:
                run("dmsetup", "remove", name)
            if made_real:
                run("dmsetup", "clear", dev.name)  # drop the snapshot-origin table not yet live
            if suspended:
                run("dmsetup", "resume", dev.name)
            if made_real:
                run("dmsetup", "remove", real)
        raise
    return {
        "kind": "raw",
        "dm_name": name,
        "origin": dev.name,
        "origin_size": dev.size,
        "real": real_dev,
        "cow_device": cow,
    }


# -- health --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """A snapshot's state from ``dmsetup status``."""

    exists: bool
    valid: bool = True
    #: Percentage of the COW (thick, raw) or of the thin pool's data in use.
    used_percent: float | None = None
    state: str = ""

    def problems(self, warn_percent: float | None = None) -> list[str]:
        if not self.exists:
            return ["the snapshot is gone"]
        if not self.valid:
            return [f"the snapshot is INVALID ({self.state}): its COW overflowed or failed; it is no image"]
        if warn_percent is not None and self.used_percent is not None and self.used_percent >= warn_percent:
            return [f"COW {self.used_percent:.1f}% full (warning at {warn_percent:g}%): it becomes invalid at 100%"]
        return []


def parse_status(text: str) -> Health:
    """``dmsetup status`` of a ``snapshot`` or ``thin`` device → :class:`Health`."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    fields = line.split()
    if len(fields) < 3:
        return Health(exists=True, valid=False, state=line or "no status")
    target, rest = fields[2], fields[3:]
    if target in ("snapshot", "snapshot-merge"):
        if not rest or rest[0] in ("Invalid", "Overflow", "Merge") or not re.fullmatch(r"\d+/\d+", rest[0]):
            return Health(exists=True, valid=False, state=" ".join(rest) or "no status")
        used, total = (int(x) for x in rest[0].split("/"))
        return Health(exists=True, used_percent=100.0 * used / total if total else None, state=rest[0])
    if target == "thin":
        if rest and rest[0] == "Fail":
            return Health(exists=True, valid=False, state="Fail")
        return Health(exists=True, state=" ".join(rest))
    return Health(exists=True, state=line)


def _pool_percent(vg: str, pool: str) -> float | None:
    found = find_lv(vg, pool)
    return found.data_percent if found else None


def health(details: Mapping[str, Any]) -> Health:
    """The state of the snapshot an image's ``details`` describe."""
    dm_name = str(details.get("dm_name") or "")
    if details.get("kind") in ("thick", "thin"):
        lv = find_lv(str(details["vg"]), str(details["lv"]))
        if lv is None:
            return Health(exists=False)
        if TAG not in lv.tags:
            return Health(exists=True, valid=False, state="not tagged 'snapcore': not ours")
        dm_name = lv.dm_name
        if len(lv.attr) > 4 and lv.attr[4] in "ISmM":  # invalid, or its merge failed
            return Health(exists=True, valid=False, state=f"invalid snapshot, lvs attr {lv.attr}")
        if not lv.active:
            return Health(exists=True, state="inactive")
    if not dm_name:
        return Health(exists=False)
    try:
        status = run("dmsetup", "status", dm_name)
    except ToolFailed as exc:
        if "No such device" in exc.stderr or "not exist" in exc.stderr:
            return Health(exists=False)
        raise
    h = parse_status(status)
    if details.get("kind") == "thin" and h.valid and details.get("pool"):
        pct = _pool_percent(str(details["vg"]), str(details["pool"]))
        return Health(exists=True, used_percent=pct, state=h.state)
    return h


# -- image access: mount read-only ---------------------------------------------------


def run_dir() -> Path:
    return default_run_dir() / "dm"


def image_mount_dir(checkpoint_id: str, mount_point: str) -> Path:
    digest = hashlib.sha256(mount_point.encode()).hexdigest()[:10]
    return run_dir() / checkpoint_id / digest


def mount_options(fstype: str) -> str:
    return MOUNT_OPTIONS.get(fstype, "ro")


def mount_image(details: Mapping[str, Any], fstype: str, where: Path) -> Path:
    """Mount the snapshot read-only at ``where`` (made if missing)."""
    where.mkdir(parents=True, exist_ok=True, mode=0o700)
    if os.path.ismount(where):
        return where
    device = f"/dev/mapper/{details['dm_name']}"
    try:
        run("mount", "-t", fstype, "-o", mount_options(fstype), device, str(where))
    except BackendError:
        # an empty directory must never pass for the image: an exporter would copy it
        with contextlib.suppress(OSError):
            where.rmdir()
        raise
    return where


def unmount_image(where: Path) -> None:
    if os.path.ismount(where):
        try:
            run("umount", str(where))
        except ToolFailed:
            run("umount", "-l", str(where))
    with contextlib.suppress(OSError):
        where.rmdir()
    with contextlib.suppress(OSError):
        where.parent.rmdir()  # the checkpoint's directory, once empty
