"""The cluster manifest (``checkpoint --cluster``), as the coordinator keeps it:
``STATE/checkpoints/ID/cluster.json``, beside that node's own manifest of the same id
when the coordinator's node took part. Read for ``list`` and ``show`` (no etcd, no
gRPC: this module is light); untrusted input like any manifest."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from snapcore.errors import SnapcoreError, UsageError

#: The cluster manifest's name, beside a node's own manifest of the same id.
CLUSTER_MANIFEST = "cluster.json"
#: A cluster manifest is a few KB a node.
MAX_BYTES = 16 << 20


def cluster_manifest_path(state_dir: Path, checkpoint_id: str) -> Path:
    from snapcore.store.manifest import manifest_path

    return manifest_path(state_dir, checkpoint_id).parent / CLUSTER_MANIFEST


def read_cluster_manifest(path: Path) -> dict[str, Any]:
    """A cluster manifest from a state directory: root's, a regular file, size-capped,
    a JSON object with an ``id`` and ``nodes``."""
    from snapcore.host.fsutil import read_regular

    try:
        data = json.loads(read_regular(path, MAX_BYTES, owned=True))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such cluster manifest") from None
    except OSError as exc:
        raise SnapcoreError(f"{path}: cannot read the cluster manifest: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise SnapcoreError(f"{path}: unreadable cluster manifest: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("id"), str) or not isinstance(data.get("nodes"), dict):
        raise SnapcoreError(f"{path}: not a cluster manifest")
    return data


def iter_cluster_manifests(state_dir: Path) -> Iterator[tuple[Path, dict[str, Any] | None, str | None]]:
    """Every cluster manifest under ``state_dir`` (unreadable ones with why)."""
    from snapcore.store.manifest import checkpoints_dir

    root = checkpoints_dir(state_dir)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        path = child / CLUSTER_MANIFEST
        if child.is_dir() and not child.is_symlink() and path.is_file():
            try:
                yield path, read_cluster_manifest(path), None
            except SnapcoreError as exc:
                yield path, None, str(exc)


def summary(manifest: Mapping[str, Any]) -> str:
    """The cluster manifest, for a person."""
    skew = manifest.get("skew_ms")
    what = "cluster restore" if manifest.get("kind") == "cluster-restore" else "cluster checkpoint"
    head = f"{what} {manifest.get('id')}: {manifest.get('outcome')}"
    if manifest.get("error"):
        head += f" — {manifest['error']}"
    if isinstance(skew, int | float):
        head += f" (freeze skew {skew:.1f} ms)"
    lines = [head]
    nodes = manifest.get("nodes")
    for name, report in nodes.items() if isinstance(nodes, Mapping) else ():
        report = report if isinstance(report, Mapping) else {}
        window = report.get("freeze_window_ms")
        line = f"  {name:<16} {report.get('state')!s:<8}"
        if isinstance(window, int | float):
            line += f" freeze window {window:.1f} ms"
        if report.get("error"):
            line += f" error: {report['error']}"
        lines.append(line)
    barriers = manifest.get("barrier_ms")
    if isinstance(barriers, Mapping) and barriers:
        lines.append("  waits for every node: " + ", ".join(f"{k} {v} ms" for k, v in barriers.items()))
    return "\n".join(lines)
