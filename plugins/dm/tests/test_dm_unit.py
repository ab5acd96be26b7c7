"""Host-side tests of the dm backend's parsing and decisions (no device-mapper needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snapcore import BackendError, Mount
from snapcore.testing.vm import Budget, Progress, find_kernel
from snapcore_dm import backend, devices, restore

LVS_JSON = {
    "report": [
        {
            "lv": [
                {
                    "vg_name": "vg0",
                    "lv_name": "data",
                    "lv_attr": "-wi-ao----",
                    "segtype": "linear",
                    "lv_size": "1073741824",
                    "pool_lv": "",
                    "origin": "",
                    "vg_free": "536870912",
                    "vg_extent_size": "4194304",
                    "data_percent": "",
                    "metadata_percent": "",
                    "lv_tags": "",
                    "lv_dm_path": "/dev/mapper/vg0-data",
                    "lv_time": "1764000000",
                },
                {
                    "vg_name": "vg0",
                    "lv_name": "data-snapcore-20261125T140102Z-1a2b",
                    "lv_attr": "swi-a-s---",
                    "segtype": "linear",
                    "lv_size": "214748364",
                    "pool_lv": "",
                    "origin": "data",
                    "vg_free": "536870912",
                    "vg_extent_size": "4194304",
                    "data_percent": "12.50",
                    "metadata_percent": "",
                    "lv_tags": "snapcore,snapcore-checkpoint=20261125T140102Z-1a2b",
                    "lv_dm_path": "/dev/mapper/vg0-data--snapcore--20261125T140102Z--1a2b",
                    "lv_time": "1764000100",
                },
            ]
        }
    ]
}


def test_parse_lvs() -> None:
    origin, snap = devices.parse_lvs(json.dumps(LVS_JSON))
    assert origin.ref == "vg0/data" and origin.active and not origin.is_snapshot
    assert origin.vg_free == 512 << 20 and origin.created == 1764000000
    assert snap.is_snapshot and snap.origin == "data" and snap.checkpoint_id == "20261125T140102Z-1a2b"
    assert snap.data_percent == 12.5 and "snapcore" in snap.tags
    assert snap.dm_name == "vg0-data--snapcore--20261125T140102Z--1a2b"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("vg0-data", ("vg0", "data")), ("my--vg-lv--1", ("my-vg", "lv-1")), ("a-b--snapcore--x", ("a", "b-snapcore-x"))],
)
def test_split_lvm_name(name: str, expected: tuple[str, str]) -> None:
    assert devices.split_lvm_name(name) == expected


def test_snapshot_sizes() -> None:
    (origin, _) = devices.parse_lvs(json.dumps(LVS_JSON))
    assert devices.snapshot_size_bytes("20%ORIGIN", origin) == int(0.2 * (1 << 30))
    assert devices.snapshot_size_bytes("1G", origin) == 1 << 30
    assert devices.snapshot_size_bytes("512", origin) == 512 << 20  # LVM's default unit is MiB
    assert devices.snapshot_size_bytes("50%FREE", origin) == 256 << 20
    assert devices.size_args("20%origin") == ["-l", "20%ORIGIN"]
    assert devices.size_args("1G") == ["-L", "1G"]
    with pytest.raises(ValueError, match="LVM syntax"):
        devices.snapshot_size_bytes("lots", origin)


@pytest.mark.parametrize(
    ("status", "valid", "percent"),
    [
        ("0 131072 snapshot 16/8192 16\n", True, 16 / 8192 * 100),
        ("0 131072 snapshot Invalid\n", False, None),
        ("0 131072 snapshot Overflow\n", False, None),
        ("0 131072 snapshot Merge failed\n", False, None),
        ("0 131072 thin 2048 131071\n", True, None),
        ("0 131072 thin Fail\n", False, None),
    ],
)
def test_parse_status(status: str, valid: bool, percent: float | None) -> None:
    health = backend.parse_status(status)
    assert health.valid is valid
    assert health.used_percent == percent
    if not valid:
        assert "INVALID" in health.problems(80)[0]


def test_health_warning_threshold() -> None:
    health = backend.Health(exists=True, used_percent=85.0)
    assert health.problems(None) == []
    assert "85.0% full" in health.problems(80)[0]
    assert backend.Health(exists=False).problems(80) == ["the snapshot is gone"]


def test_snapshot_names_fit() -> None:
    assert backend.snapshot_name("data", "20261125T140102Z-1a2b") == "data-snapcore-20261125T140102Z-1a2b"
    long = backend.snapshot_name("x" * 100, "y" * 128)
    assert len(long) <= 100 and "-snapcore-" in long


def test_details_from_a_bare_ref() -> None:
    # what 'snapcore recover' hands to discard for a snapshot it found by listing
    assert restore.details_from_ref("vg0/data-snapcore-x", None) == {
        "kind": "lvm",
        "vg": "vg0",
        "lv": "data-snapcore-x",
    }
    origin = devices.DmDevice(name="rawsc", uuid="", devnode="/dev/dm-0", major=253, minor=0, size=1 << 20)
    raw = restore.details_from_ref("dm:rawsc-snapcore-x", origin)
    assert raw == {"kind": "raw", "dm_name": "rawsc-snapcore-x", "origin": "rawsc"}
    for bad in ("nothing", "/lv", "vg/"):
        with pytest.raises(BackendError, match="no dm image reference"):
            restore.details_from_ref(bad, None)
    with pytest.raises(BackendError, match="origin device is gone"):
        restore.details_from_ref("dm:rawsc-snapcore-x", None)


def test_probe_of_a_plain_mount_says_why_not() -> None:
    mount = Mount(
        mount_id=1,
        parent_id=0,
        major=0,
        minor=40,
        root="/",
        mount_point="/run",
        mount_options=("rw",),
        fstype="tmpfs",
        source="tmpfs",
        super_options=(),
    )
    support = backend.probe(mount)
    assert not support.ok and "not a device-mapper device" in support.reason


def test_mount_options_never_replay_journals() -> None:
    assert backend.mount_options("ext4") == "ro,noload"
    assert backend.mount_options("xfs") == "ro,nouuid,norecovery"


def _events(path: Path, *events: dict[str, object]) -> None:
    with open(path, "a") as f:
        for event in events:
            f.write(json.dumps(event) + "\n")


def test_progress_reads_the_guest_stream_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    progress = Progress(path=path, launched=100.0)
    progress.poll(101.0)  # nothing written yet
    assert progress.boot_s is None
    _events(path, {"ev": "session", "uptime": 7.5}, {"ev": "collected", "n": 3}, {"ev": "start", "nodeid": "t.py::a"})
    _events(path, {"ev": "report", "nodeid": "t.py::a", "when": "call", "outcome": "passed", "duration": 1.5})
    _events(path, {"ev": "report", "nodeid": "t.py::a", "when": "teardown", "outcome": "passed", "duration": 0.1})
    _events(path, {"ev": "start", "nodeid": "t.py::b"})
    _events(path, {"ev": "report", "nodeid": "t.py::b", "when": "call", "outcome": "failed", "message": "boom"})
    with open(path, "a") as f:
        f.write('{"ev": "start", "nodeid": "t.py::c"}\n{"ev": "measure", "figu')  # a line still being written
    seen: list[dict[str, object]] = []
    progress.poll(112.0, seen.append)
    assert progress.boot_s == 12.0 and progress.guest_uptime_s == 7.5 and progress.collected == 3
    assert progress.outcomes == {"t.py::a": "passed", "t.py::b": "failed"}
    assert progress.running == "t.py::c" and progress.running_since == 112.0
    assert [e["ev"] for e in seen][-1] == "start"  # the torn line waits for its end
    with open(path, "a") as f:
        f.write('res": {"lvcreate_s": 2.5}}\n')
    progress.poll(113.0)
    assert progress.measures == {"lvcreate_s": 2.5}
    summary = progress.summary()
    assert "RUNNING when stopped: t.py::c" in summary and "failed  t.py::b" in summary and "boom" in summary


def test_budget_derives_each_tests_allowance_from_the_runs_measurements(tmp_path: Path) -> None:
    budget = Budget(boot_floor_s=100, test_floor_s=10, boot_times=2, per_measure={"lvcreate_s": 20})
    progress = Progress(path=tmp_path / "none", launched=0.0)
    assert budget.exceeded(progress, 99.0) is None
    assert "boot budget" in (budget.exceeded(progress, 101.0) or "")
    progress.boot_s, progress.last_event = 8.0, 8.0
    progress.running, progress.running_since = "t.py::slow", 8.0
    assert budget.per_test(progress)[0] == 16.0  # 2 x the boot
    progress.measures["lvcreate_s"] = 3.0
    seconds, why = budget.per_test(progress)
    assert seconds == 60.0 and "20 x lvcreate_s 3.00s" in why
    assert budget.exceeded(progress, 67.0) is None
    assert "t.py::slow ran 61s" in (budget.exceeded(progress, 69.0) or "")


def test_find_kernel(tmp_path: Path) -> None:
    for name in ("vmlinuz-6.1.0-9-amd64", "vmlinuz-6.1.0-56-amd64", "vmlinuz-6.18.0-custom"):
        (tmp_path / name).write_bytes(b"")
    found = find_kernel(tmp_path)
    assert found is not None and found.name == "vmlinuz-6.1.0-56-amd64"
    assert find_kernel(tmp_path / "none") is None
