"""What is done to a snapshot after its checkpoint: discard it, list them, restore
from one — copied out (:func:`copy_tree`) or merged into its origin in place
(``lvconvert --merge``; for a raw origin, a ``snapshot-merge`` table).

Only what snapcore made is ever listed or deleted: LVM snapshots carry the tag
``snapcore`` (and ``snapcore-checkpoint=ID``), raw ones a dm uuid ``SNAPCORE-…``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snapcore import (
    BackendError,
    Mount,
    MountBusy,
    ToolFailed,
    mount_holders,
)
from snapcore_dm import NAME
from snapcore_dm.backend import parse_status, raw_real_name
from snapcore_dm.devices import (
    LV,
    RAW_UUID,
    TAG,
    DmDevice,
    dm_device_by_name,
    dm_escape,
    find_lv,
    lvm_names,
    lvs,
    run,
)

log = logging.getLogger(__name__)


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
    real = raw_real_name(origin)
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
    real = raw_real_name(origin)
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
    dev = dm_device_by_name(f"{dm_escape(vg)}-{dm_escape(origin)}")
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
    real = raw_real_name(origin)
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
