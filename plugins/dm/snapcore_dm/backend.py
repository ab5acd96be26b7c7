"""device-mapper snapshots: LVM thick and thin logical volumes, and raw dm devices.

Testable without pluggy: :mod:`snapcore_dm.hooks` only calls into here.

* **LVM thick** (``linear``/``striped`` LVs): ``lvcreate -s`` with a COW of
  ``options.size`` (``20%ORIGIN``, ``1G``) taken from the VG's free extents.
* **LVM thin**: ``lvcreate -s`` without a size; the room is the pool's.
* **raw dm** (not LVM): the origin's table moves to ``NAME-sc-real``, the origin is
  reloaded as ``snapshot-origin`` of it and a ``snapshot`` target is stacked on a
  COW device the admin names (``options.cow_device``) — what LVM does internally.

The kernel freezes the filesystem itself while it suspends the origin for the
snapshot (dm "lockfs"), so this backend never FIFREEZEs: a second freeze would make
the suspend fail with EBUSY. The image is a clean filesystem at the suspend instant.

Devices are read through pyudev (sysfs ``dm/name``, ``dm/uuid`` first; udev's
``DM_VG_NAME``/``DM_LV_NAME`` when a udev daemon runs), and LVM's own view comes
from ``lvs``. Without a udev daemon (``/run/udev/control`` absent) the tools run
with ``DM_DISABLE_UDEV=1`` so that they make their own ``/dev/mapper`` nodes.

Only what snapcore made is ever listed or deleted: LVM snapshots carry the tag
``snapcore`` (and ``snapcore-checkpoint=ID``), raw ones a dm uuid ``SNAPCORE-…``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore import (
    BackendError,
    Image,
    MissingTool,
    Mount,
    MountBusy,
    Support,
    Target,
    ToolFailed,
    block_devnum,
    default_run_dir,
    human_bytes,
    mount_holders,
    run_tool,
    tool_env,
    udev_attr,
    udev_device,
)
from snapcore_dm import NAME

log = logging.getLogger(__name__)

TAG = "snapcore"
TAG_CHECKPOINT = "snapcore-checkpoint="
RAW_UUID = "SNAPCORE-SNAP-"
RAW_REAL_UUID = "SNAPCORE-REAL-"

#: Tool → Debian package that ships it.
PACKAGES = {"lvm": "lvm2", "dmsetup": "dmsetup", "mount": "mount", "umount": "mount"}

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

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)([bBsSkKmMgGtTpPeE]?)$")
_PERCENT_RE = re.compile(r"^(\d+(?:\.\d+)?)%(ORIGIN|FREE|VG)$", re.IGNORECASE)
_UNITS = {"": 2**20, "b": 1, "s": 512, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50, "e": 2**60}


# -- running tools -------------------------------------------------------------------


def lvm_env() -> dict[str, str]:
    extra = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
    if not os.path.exists("/run/udev/control"):
        # no udev daemon: without this, lvcreate waits for /dev nodes nobody makes
        extra["DM_DISABLE_UDEV"] = "1"
    return tool_env(extra)


def run(tool: str, *args: str, stdin: str | None = None, mount: str | None = None, timeout: float | None = None) -> str:
    """Run ``tool args`` (:func:`snapcore.run_tool`): its stdout, or
    :class:`ToolFailed` with its stderr. No ``timeout`` by default: the core's
    deadline watchdog bounds the freeze window (and resumes the origin through
    ``snapcore_rescue``)."""
    return run_tool(
        [tool, *args],
        backend=NAME,
        package=PACKAGES.get(tool, "lvm2"),
        mount=mount,
        stdin=stdin,
        timeout=timeout,
        env=lvm_env(),
    )


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# -- devices (pyudev) and LVM ------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DmDevice:
    """A device-mapper block device as sysfs (and udev, when it runs) describe it."""

    name: str
    uuid: str
    devnode: str
    major: int
    minor: int
    size: int  # bytes
    #: From udev's database; None without a udev daemon (then ask ``dmsetup``).
    vg: str | None = None
    lv: str | None = None

    @property
    def is_lvm(self) -> bool:
        return self.uuid.startswith("LVM-")

    @property
    def is_ours(self) -> bool:
        return self.uuid.startswith(("SNAPCORE-",))

    @property
    def mapper(self) -> str:
        return f"/dev/mapper/{self.name}"


def dm_device(devnum: int) -> DmDevice | None:
    """The dm device with number ``devnum``, or None when it is not one."""
    device = udev_device(devnum)
    if device is None:
        return None
    props = device.properties
    name = udev_attr(device, "dm/name") or props.get("DM_NAME")
    if not name:
        return None
    size = udev_attr(device, "size")
    return DmDevice(
        name=name,
        uuid=udev_attr(device, "dm/uuid") or props.get("DM_UUID") or "",
        devnode=device.device_node or f"/dev/mapper/{name}",
        major=os.major(devnum),
        minor=os.minor(devnum),
        size=int(size) * 512 if size else 0,
        vg=props.get("DM_VG_NAME"),
        lv=props.get("DM_LV_NAME"),
    )


def dm_device_of_mount(mount: Mount) -> DmDevice | None:
    devnum = block_devnum(mount)
    return None if devnum is None else dm_device(devnum)


def dm_device_by_name(name: str) -> DmDevice | None:
    out = run("dmsetup", "info", "-c", "--noheadings", "--separator", ":", "-o", "major,minor", name)
    major, minor = (int(x) for x in out.strip().split(":"))
    return dm_device(os.makedev(major, minor))


def split_lvm_name(name: str) -> tuple[str, str]:
    """``vg-lv`` (dashes doubled inside names) → ``(vg, lv)``, like ``dmsetup splitname``."""
    parts = re.split(r"(?<!-)-(?!-)", name)
    if len(parts) < 2:
        raise ValueError(f"{name!r} is not an LVM dm name")
    vg, lv = parts[0], parts[1]
    return vg.replace("--", "-"), lv.replace("--", "-")


@dataclass(frozen=True, slots=True, kw_only=True)
class LV:
    """One line of ``lvs``, the fields this backend needs."""

    vg: str
    name: str
    attr: str
    segtype: str
    size: int
    pool: str
    origin: str
    vg_free: int
    extent_size: int
    data_percent: float | None
    metadata_percent: float | None
    tags: tuple[str, ...]
    dm_path: str
    created: float | None

    @property
    def ref(self) -> str:
        return f"{self.vg}/{self.name}"

    @property
    def active(self) -> bool:
        return len(self.attr) > 4 and self.attr[4] == "a"

    @property
    def is_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")

    @property
    def thin(self) -> bool:
        return self.segtype == "thin"

    @property
    def checkpoint_id(self) -> str | None:
        for tag in self.tags:
            if tag.startswith(TAG_CHECKPOINT):
                return tag[len(TAG_CHECKPOINT) :]
        return None

    @property
    def dm_name(self) -> str:
        return os.path.basename(self.dm_path) if self.dm_path else f"{_dm_escape(self.vg)}-{_dm_escape(self.name)}"


def _dm_escape(name: str) -> str:
    return name.replace("-", "--")


LVS_FIELDS = (
    "vg_name,lv_name,lv_attr,segtype,lv_size,pool_lv,origin,vg_free,vg_extent_size,"
    "data_percent,metadata_percent,lv_tags,lv_dm_path,lv_time"
)


def _float(value: str) -> float | None:
    try:
        return float(value) if value.strip() else None
    except ValueError:
        return None


def _int(value: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        return 0


def parse_lvs(text: str) -> list[LV]:
    """Parse ``lvs --reportformat json`` with :data:`LVS_FIELDS`."""
    rows = json.loads(text)["report"][0]["lv"]
    lvs = []
    for row in rows:
        lvs.append(
            LV(
                vg=row["vg_name"],
                name=row["lv_name"].strip("[]"),  # [NAME]: hidden (a merging snapshot)
                attr=row["lv_attr"],
                segtype=row["segtype"],
                size=_int(row["lv_size"]),
                pool=row.get("pool_lv", ""),
                origin=row.get("origin", ""),
                vg_free=_int(row["vg_free"]),
                extent_size=_int(row["vg_extent_size"]),
                data_percent=_float(row.get("data_percent", "")),
                metadata_percent=_float(row.get("metadata_percent", "")),
                tags=tuple(t for t in row.get("lv_tags", "").split(",") if t),
                dm_path=row.get("lv_dm_path", ""),
                created=_float(row.get("lv_time", "")),
            )
        )
    return lvs


def lvs(*selection: str, select: str | None = None, mount: str | None = None) -> list[LV]:
    args = [
        "lvs",
        "-a",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "--config",
        'report{time_format="%s"}',
        "-o",
        LVS_FIELDS,
    ]
    if select:
        args += ["-S", select]
    return parse_lvs(run("lvm", *args, *selection, mount=mount))


def vg_lvs(vg: str, *, mount: str | None = None) -> list[LV]:
    """Every LV of ``vg``, hidden ones too; none when LVM does not know the VG."""
    try:
        return lvs(vg, mount=mount)
    except ToolFailed as exc:
        if "not found" in exc.stderr or "Failed to find" in exc.stderr:
            return []
        raise


def pick(found: Sequence[LV], lv: str) -> LV | None:
    return next((x for x in found if x.name == lv), None)


def find_lv(vg: str, lv: str, *, mount: str | None = None) -> LV | None:
    # the whole VG with -a, not VG/LV: a snapshot waiting to merge is hidden ([NAME])
    # and 'lvs VG/NAME' no longer finds it
    return pick(vg_lvs(vg, mount=mount), lv)


def lvm_names(dev: DmDevice) -> tuple[str, str]:
    """VG and LV of an LVM device: udev's properties when it runs, else its dm name."""
    if dev.vg and dev.lv:
        return dev.vg, dev.lv
    return split_lvm_name(dev.name)


# -- sizes -------------------------------------------------------------------------


def snapshot_size_bytes(size: str, origin: LV) -> int:
    """What a thick snapshot of ``size`` (LVM syntax) takes from the VG, in bytes."""
    text = size.strip()
    m = _PERCENT_RE.fullmatch(text)
    if m:
        pct = float(m.group(1)) / 100
        base = {"ORIGIN": origin.size, "FREE": origin.vg_free}.get(m.group(2).upper())
        if base is None:
            raise ValueError(f"size {size!r}: only %ORIGIN and %FREE make sense for a snapshot")
        return int(base * pct)
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"size {size!r}: use LVM syntax such as 20%ORIGIN, 512M or 1G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def size_args(size: str) -> list[str]:
    """``lvcreate`` arguments for ``size``: ``-l`` for percentages, ``-L`` otherwise."""
    text = size.strip()
    return ["-l", text.upper()] if _PERCENT_RE.fullmatch(text) else ["-L", text]


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
            "dm_name": f"{_dm_escape(lv.vg)}-{_dm_escape(plan.name)}",
            "origin_size": lv.size,
            "pool": lv.pool or None,
        }
    assert plan.cow_device is not None
    return raw_snapshot(source, plan.name, plan.cow_device, mount=mount)


def _raw_real_name(origin: str) -> str:
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
    real = _raw_real_name(dev.name)
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


# -- discard / list / restore --------------------------------------------------------


def details_from_ref(ref: str, origin: DmDevice | None) -> dict[str, Any]:
    """What an image's ``ref`` alone says, for an image that carries no details.

    ``snapcore recover`` knows only the ref of a snapshot it found by listing (the
    controller died between making it and journaling it): ``VG/LV`` for LVM,
    ``dm:NAME`` for a raw one, whose origin is the target's own device.
    """
    if ref.startswith("dm:"):
        name = ref[3:]
        if origin is None:
            raise BackendError(f"{ref}: the origin device is gone: cannot tell how to discard it", backend=NAME)
        return {"kind": "raw", "dm_name": name, "origin": origin.name}
    vg, sep, lv = ref.partition("/")
    if not sep or not vg or not lv:
        raise BackendError(f"{ref!r} is no dm image reference (VG/LV or dm:NAME)", backend=NAME)
    return {"kind": "lvm", "vg": vg, "lv": lv}  # thick or thin: discarded alike


def discard(details: Mapping[str, Any]) -> None:
    """Delete a snapshot snapcore made; a missing one is fine."""
    kind = details.get("kind")
    if kind in ("thick", "thin", "lvm"):
        lv = find_lv(str(details["vg"]), str(details["lv"]))
        if lv is None:
            return
        if TAG not in lv.tags:
            raise BackendError(f"{lv.ref} is not tagged {TAG!r}: refusing to delete it", backend=NAME)
        run("lvm", "lvremove", "-q", "-y", lv.ref)
        return
    if kind == "raw":
        discard_raw(str(details["dm_name"]), str(details["origin"]))


def _dm_names_uuids() -> list[tuple[str, str]]:
    out = run("dmsetup", "info", "-c", "--noheadings", "--separator", "\t", "-o", "name,uuid")
    rows = []
    for line in out.splitlines():
        if line.strip() and "\t" in line:
            name, uuid = line.split("\t", 1)
            rows.append((name.strip(), uuid.strip()))
        elif line.strip() and line.strip() != "No devices found":
            rows.append((line.strip(), ""))
    return rows


def raw_snapshots_of(origin: str) -> list[str]:
    """Names of snapcore's raw snapshots stacked on ``origin``."""
    real = _raw_real_name(origin)
    found = []
    for name, uuid in _dm_names_uuids():
        if uuid.startswith(RAW_UUID):
            table = run("dmsetup", "table", name).split()
            if len(table) > 3 and table[2] == "snapshot" and _same_device(table[3], real):
                found.append(name)
    return found


def _same_device(spec: str, name: str) -> bool:
    dev = dm_device_by_name(name) if _exists(name) else None
    return dev is not None and spec in (f"{dev.major}:{dev.minor}", f"/dev/mapper/{name}")


def _exists(name: str) -> bool:
    return any(n == name for n, _ in _dm_names_uuids())


def discard_raw(name: str, origin: str) -> None:
    names = dict(_dm_names_uuids())
    if name in names:
        if not names[name].startswith(RAW_UUID):
            raise BackendError(f"dm device {name} is not a snapcore snapshot: refusing to remove it", backend=NAME)
        run("dmsetup", "remove", name)
    real = _raw_real_name(origin)
    if real in names and not raw_snapshots_of(origin):
        restore_origin_table(origin, real)


def restore_origin_table(origin: str, real: str) -> None:
    """Put the origin's own table back (from ``ORIGIN-sc-real``) and drop the real device."""
    table = run("dmsetup", "table", real)
    run("dmsetup", "reload", origin, stdin=table)
    run("dmsetup", "suspend", origin)
    run("dmsetup", "resume", origin)
    run("dmsetup", "remove", real)


def list_lvm(dev: DmDevice) -> list[LV]:
    vg, name = lvm_names(dev)
    return [lv for lv in lvs(vg, select=f"lv_tags={TAG}") if lv.origin == name]


def copy_tree(src: Path, dest: Path) -> None:
    """Copy ``src``'s contents into ``dest`` (made; must be empty) with GNU cp."""
    if dest.exists() and any(dest.iterdir()):
        raise BackendError(f"{dest} is not empty: refusing to overwrite it", backend=NAME)
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["cp", "-a", "--reflink=never", f"{src}/.", str(dest)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BackendError(f"copying {src} to {dest} failed: {proc.stderr.strip()[-300:]}", backend=NAME)


def merge_lvm(details: Mapping[str, Any]) -> str:
    """Roll the origin back to the snapshot with ``lvconvert --merge``."""
    vg, name, origin = str(details["vg"]), str(details["lv"]), str(details["origin"])
    lv = find_lv(vg, name)
    if lv is None:
        raise BackendError(f"snapshot {vg}/{name} is gone: nothing to merge", backend=NAME)
    if TAG not in lv.tags:
        raise BackendError(f"{lv.ref} is not a snapcore snapshot", backend=NAME)
    out = ""
    try:
        out = run("lvm", "lvconvert", "-y", "--merge", lv.ref)
    except ToolFailed as exc:
        out = exc.stderr
        if "Delaying merge" not in exc.stderr and "delayed" not in exc.stderr.lower():
            raise
    if find_lv(vg, name) is not None:
        return (
            f"merge of {vg}/{name} into {vg}/{origin} is scheduled: it completes at the next activation of "
            f"{vg}/{origin} (it is open now: unmount it, then 'lvchange -an {vg}/{origin}; lvchange -ay "
            f"{vg}/{origin}', or reboot)"
        )
    log.debug("lvconvert --merge: %s", out)
    return f"{vg}/{origin} rolled back to the snapshot {name} (merged; the snapshot is gone)"


def restore_in_place(details: Mapping[str, Any], mount: Mount) -> str:
    """Roll an LV back to its snapshot so that ``mount`` shows the result when this
    returns (a restored program starts on it next): unmount it, merge, mount it
    again. LVM alone would only schedule the merge of an open origin for its next
    activation; a mount in use is refused instead (:class:`MountBusy`, nothing
    changed), and so is an origin held open elsewhere."""
    if details.get("kind") == "raw":
        return merge_raw(details)
    vg, origin = str(details["vg"]), str(details["origin"])
    dev = dm_device_by_name(f"{_dm_escape(vg)}-{_dm_escape(origin)}")
    mp = mount.mount_point
    ours = dev is not None and (mount.major, mount.minor) == (dev.major, dev.minor) and os.path.ismount(mp)
    if ours:
        holders = mount_holders(mp)
        if holders:
            raise MountBusy(mp, holders, backend=NAME)
        done = subprocess.run(["umount", mp], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise MountBusy(mp, mount_holders(mp) or [done.stderr.strip()], backend=NAME)
    try:
        if dev is not None:
            held = os.listdir(f"/sys/dev/block/{dev.major}:{dev.minor}/holders")
            if _is_mounted(dev) or held or _open_count(dev.name) > 0:
                raise BackendError(
                    f"{vg}/{origin} is still open (mounted elsewhere, or held by {', '.join(held) or 'a process'}): "
                    "its merge would wait for its next activation; close it, then restore again (nothing was "
                    "changed)",
                    mount=mp,
                    backend=NAME,
                )
        message = merge_lvm(details)
    finally:
        if ours:
            _mount_again(mount)
    return f"{message}; {mp} was mounted again" if ours else message


def _open_count(name: str) -> int:
    out = run("dmsetup", "info", "-c", "--noheadings", "-o", "open", name).strip()
    return int(out) if out.isdigit() else 0


def _mount_again(mount: Mount) -> None:
    opts = [o for o in (*mount.mount_options, *mount.super_options) if o not in ("rw", "ro")]
    opts.append("ro" if mount.read_only else "rw")
    run("mount", "-t", mount.fstype, "-o", ",".join(dict.fromkeys(opts)), mount.source, mount.mount_point)


def merge_raw(details: Mapping[str, Any], *, timeout: float = 600.0) -> str:
    """Roll a raw origin back: reload it as ``snapshot-merge`` and wait for the merge."""
    name, origin = str(details["dm_name"]), str(details["origin"])
    real = _raw_real_name(origin)
    origin_dev = dm_device_by_name(origin)
    if origin_dev is None:
        raise BackendError(f"origin {origin} is gone", backend=NAME)
    holders = os.listdir(f"/sys/dev/block/{origin_dev.major}:{origin_dev.minor}/holders")
    if _is_mounted(origin_dev) or holders:
        raise BackendError(f"{origin} is in use (mounted or held): unmount it before an in-place restore", backend=NAME)
    snap = run("dmsetup", "table", name).split()
    h = parse_status(run("dmsetup", "status", name))
    if not h.valid:
        raise BackendError(f"snapshot {name} is invalid ({h.state}): it cannot be merged", backend=NAME)
    sectors, real_dev, cow, chunk = snap[1], snap[3], snap[4], snap[6]
    others = [n for n in raw_snapshots_of(origin) if n != name]
    if others:
        raise BackendError(f"{origin} has other snapshots ({', '.join(others)}): discard them first", backend=NAME)
    run("dmsetup", "suspend", origin)
    run("dmsetup", "remove", name)
    run("dmsetup", "reload", origin, "--table", f"0 {sectors} snapshot-merge {real_dev} {cow} P {chunk}")
    run("dmsetup", "resume", origin)
    deadline = time.monotonic() + timeout
    while True:  # merged when only the metadata chunks remain: "<used>/<total> <metadata>"
        fields = run("dmsetup", "status", origin).split()
        if len(fields) >= 5 and "/" in fields[3] and fields[3].split("/")[0] == fields[4]:
            break
        if time.monotonic() > deadline:
            raise BackendError(f"merge into {origin} still running after {timeout:g}s", backend=NAME)
        time.sleep(0.2)
    restore_origin_table(origin, real)
    return f"{origin} rolled back to the snapshot {name} (merged; the snapshot is gone)"


def _is_mounted(dev: DmDevice) -> bool:
    wanted = f"{dev.major}:{dev.minor}"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[2] == wanted for line in f)
