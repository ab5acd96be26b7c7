"""snapcore: filesystems made consistent with a process checkpoint.

Plugins import what they need from here; everything else is private. The heavy
parts (the transaction, the API) are imported on first use so that the CLI starts
fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

from snapcore.cancel import Cancel, tied_to_controller
from snapcore.errors import (
    BackendError,
    Cancelled,
    CheckpointFailed,
    DeadlineExceeded,
    FrozenElsewhere,
    MissingTool,
    MountBusy,
    PluginError,
    PolicyError,
    SnapcoreError,
    StillNeeded,
    ThawError,
    UnsupportedMount,
    UsageError,
)
from snapcore.fsutil import block_devnum, human_bytes, syncfs
from snapcore.lazy import lazy_import
from snapcore.log import get_logger
from snapcore.types import (
    BackendInfo,
    Checkpoint,
    Consistency,
    Export,
    Image,
    ImageEntry,
    Keep,
    Mount,
    Option,
    OptionKind,
    Outcome,
    Phase,
    Rescue,
    RescueKind,
    Restored,
    Role,
    Support,
    Target,
)

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("snapcore")

if TYPE_CHECKING:
    from snapcore.api import checkpoint, hold, plan
    from snapcore.confine import Untrusted, plain_name
    from snapcore.fsutil import read_regular
    from snapcore.holders import Holder, mount_holders
    from snapcore.manifest import Manifest
    from snapcore.mounts import udev_attr, udev_device
    from snapcore.watchdog import start_guard

_LAZY = {
    "checkpoint": "snapcore.api",
    "hold": "snapcore.api",
    "plan": "snapcore.api",
    "Manifest": "snapcore.manifest",
    "Holder": "snapcore.holders",
    "Untrusted": "snapcore.confine",
    "plain_name": "snapcore.confine",
    "read_regular": "snapcore.fsutil",
    "mount_holders": "snapcore.holders",
    "start_guard": "snapcore.watchdog",
    "udev_attr": "snapcore.mounts",
    "udev_device": "snapcore.mounts",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'snapcore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "BackendError",
    "BackendInfo",
    "Cancel",
    "Cancelled",
    "Checkpoint",
    "CheckpointFailed",
    "Consistency",
    "DeadlineExceeded",
    "Export",
    "FrozenElsewhere",
    "Holder",
    "Image",
    "ImageEntry",
    "Keep",
    "Manifest",
    "MissingTool",
    "Mount",
    "MountBusy",
    "Option",
    "OptionKind",
    "Outcome",
    "Phase",
    "PluginError",
    "Rescue",
    "RescueKind",
    "Restored",
    "PolicyError",
    "Role",
    "SnapcoreError",
    "StillNeeded",
    "Support",
    "Target",
    "ThawError",
    "UnsupportedMount",
    "Untrusted",
    "UsageError",
    "__version__",
    "block_devnum",
    "checkpoint",
    "hold",
    "get_logger",
    "hookimpl",
    "human_bytes",
    "lazy_import",
    "mount_holders",
    "plain_name",
    "plan",
    "read_regular",
    "start_guard",
    "syncfs",
    "tied_to_controller",
    "udev_attr",
    "udev_device",
]
