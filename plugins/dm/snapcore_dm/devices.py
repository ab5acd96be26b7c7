"""What the device-mapper and LVM state is: the tools that read and change it, the
devices, the logical volumes, and LVM's size syntax.

* **running tools**: ``lvm``, ``dmsetup``, ``mount`` through :func:`snapcore.run_tool`.
  Without a udev daemon (``/run/udev/control`` absent) they run with
  ``DM_DISABLE_UDEV=1`` so that they make their own ``/dev/mapper`` nodes.
* **devices**: read through pyudev (sysfs ``dm/name``, ``dm/uuid`` first; udev's
  ``DM_VG_NAME``/``DM_LV_NAME`` when a udev daemon runs), raw dm and LVM alike.
* **LVM**: LVM's own view comes from ``lvs`` (:class:`LV`).
* **sizes**: a thick snapshot's COW ``size`` in ``lvcreate`` syntax.

Also the marks that say a device is snapcore's (:data:`TAG`, :data:`RAW_UUID`…):
every other module reads them from here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from snapcore import (
    Mount,
    ToolFailed,
    block_devnum,
    run_tool,
    tool_env,
    udev_attr,
    udev_device,
)
from snapcore_dm import NAME

#: Marks of what snapcore made: the tags of its LVM snapshots, the dm uuid prefixes of
#: its raw ones (and of a raw origin's moved table, ``ORIGIN-sc-real``).
TAG = "snapcore"
TAG_CHECKPOINT = "snapcore-checkpoint="
RAW_UUID = "SNAPCORE-SNAP-"
RAW_REAL_UUID = "SNAPCORE-REAL-"

#: Tool → Debian package that ships it.
PACKAGES = {"lvm": "lvm2", "dmsetup": "dmsetup", "mount": "mount", "umount": "mount"}

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
        return os.path.basename(self.dm_path) if self.dm_path else f"{dm_escape(self.vg)}-{dm_escape(self.name)}"


def dm_escape(name: str) -> str:
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
