"""Containers for tests, built here and never pulled: a busybox rootfs and the
counter program the container tests run (runc, podman)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

#: The container's program: a file held open after it is deleted (fd 3), then a
#: counter in /data/count, one step per 50 ms, that goes on from the file's value.
COUNTER_PROGRAM = (
    "echo 'held while deleted' > /data/deleted; exec 3</data/deleted; rm /data/deleted; "
    # written aside and renamed: a dump between a truncate and its write left an empty
    # counter for the test to read (a podman test failed on it once)
    "i=$(cat /data/count 2>/dev/null || echo 0); "
    "while :; do i=$((i+1)); echo $i > /data/count.new; mv /data/count.new /data/count; sleep 0.05; done"
)
#: What the deleted file held.
HELD_WHILE_DELETED = "held while deleted\n"
BUSYBOX = "/usr/bin/busybox"


def busybox_rootfs(
    root: str | os.PathLike[str], applets: tuple[str, ...] = ("sh", "sleep", "cat", "echo", "rm", "mv")
) -> Path:
    """A minimal rootfs at ``root``: busybox (Debian's static one) and its applets."""
    base = Path(root)
    for d in ("bin", "proc", "dev", "sys", "tmp", "data", "etc"):
        (base / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, base / "bin" / "busybox")
    for applet in applets:
        (base / "bin" / applet).symlink_to("busybox")
    (base / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    return base


def runc_bundle(
    bundle: Path,
    rootfs: str | os.PathLike[str],
    program: str,
    *,
    criu_conf: Path | None = None,
    volumes: dict[str, Path] | None = None,
) -> None:
    """An OCI bundle for a busybox rootfs that runs ``program`` (``sh -c``):
    bind-mounted volumes (container path → host directory), CRIU's config file named
    by the ``org.criu.config`` annotation. No network namespace: CRIU would need
    iptables-restore to lock it."""
    bundle.mkdir(exist_ok=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": os.fspath(rootfs), "readonly": False}
    config["process"]["terminal"] = False
    config["process"]["args"] = ["sh", "-c", program]
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    config["mounts"] += [
        {"destination": inside, "type": "bind", "source": str(host), "options": ["rbind", "rw"]}
        for inside, host in (volumes or {}).items()
    ]
    if criu_conf is not None:
        config["annotations"] = {"org.criu.config": str(criu_conf)}
    (bundle / "config.json").write_text(json.dumps(config))


def read_count(path: Path) -> int | None:
    """The counter's value, None while it is being rewritten or not there."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def wait_for_count(path: Path, above: int, timeout: float) -> int:
    """Wait until the counter at ``path`` passes ``above``; its value then."""
    deadline = time.monotonic() + timeout
    while True:
        value = read_count(path)
        if value is not None and value > above:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the container's counter ({path}) did not pass {above} within {timeout:.0f}s")
        time.sleep(0.02)
