"""snapcore: filesystems made consistent with a process checkpoint.

The public surface is what this module exports, plus :mod:`snapcore.testing` (test
helpers and pytest fixtures) and :mod:`snapcore.contract` (the contract every backend
passes); :mod:`snapcore.hookspecs` documents the hooks. Every other module is internal:
plugins import only from here (a test fails the suite otherwise), and what a plugin
needs belongs here. The heavy parts (the transaction, the API) are imported on first
use so that the command starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

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
    ToolFailed,
    UnsupportedMount,
    Untrusted,
    UsageError,
)
from snapcore.host.fsutil import block_devnum, human_bytes, syncfs
from snapcore.lazy import lazy_import
from snapcore.log import get_logger
from snapcore.safety.cancel import Cancel, tied_to_controller
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
    from snapcore.api import (
        Listed,
        Recovered,
        backend_options,
        check_policy,
        checkpoint,
        delete,
        hold,
        list_checkpoints,
        plan,
        prune,
        recover,
        rehearse,
        restore,
        show,
        verify,
    )
    from snapcore.cli import main
    from snapcore.host.fsutil import read_regular
    from snapcore.host.locks import default_run_dir
    from snapcore.host.mounts import find_mount, udev_attr, udev_device
    from snapcore.host.tools import TOOL_LOCALE, find_tool, run_tool, stderr_tail, tool_env, write_atomic
    from snapcore.plugins import Plugins, make_plugins
    from snapcore.policy import Policy, load_policy
    from snapcore.policy.model import parse_size
    from snapcore.safety.deadline import start_guard
    from snapcore.safety.guard import FIFREEZE, FITHAW
    from snapcore.store.confine import plain_name
    from snapcore.store.manifest import Manifest, TargetRecord
    from snapcore.store.restore import MountRestored, Verification
    from snapcore.store.retention import Deletion, PruneReport
    from snapcore.tasks.holders import Holder, mount_holders
    from snapcore.transaction import Selection, TaskSpec

_LAZY = {
    **dict.fromkeys(
        (
            "Listed",
            "Recovered",
            "backend_options",
            "check_policy",
            "checkpoint",
            "delete",
            "hold",
            "list_checkpoints",
            "plan",
            "prune",
            "recover",
            "rehearse",
            "restore",
            "show",
            "verify",
        ),
        "snapcore.api",
    ),
    "main": "snapcore.cli",
    "Deletion": "snapcore.store.retention",
    "PruneReport": "snapcore.store.retention",
    "MountRestored": "snapcore.store.restore",
    "Verification": "snapcore.store.restore",
    "Plugins": "snapcore.plugins",
    "make_plugins": "snapcore.plugins",
    "Policy": "snapcore.policy",
    "load_policy": "snapcore.policy",
    "parse_size": "snapcore.policy.model",
    "Selection": "snapcore.transaction",
    "TaskSpec": "snapcore.transaction",
    "find_mount": "snapcore.host.mounts",
    **dict.fromkeys(
        ("find_tool", "run_tool", "stderr_tail", "tool_env", "write_atomic", "TOOL_LOCALE"), "snapcore.host.tools"
    ),
    "FIFREEZE": "snapcore.safety.guard",
    "FITHAW": "snapcore.safety.guard",
    "default_run_dir": "snapcore.host.locks",
    "Manifest": "snapcore.store.manifest",
    "TargetRecord": "snapcore.store.manifest",
    "Holder": "snapcore.tasks.holders",
    "plain_name": "snapcore.store.confine",
    "read_regular": "snapcore.host.fsutil",
    "mount_holders": "snapcore.tasks.holders",
    "start_guard": "snapcore.safety.deadline",
    "udev_attr": "snapcore.host.mounts",
    "udev_device": "snapcore.host.mounts",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'snapcore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "TOOL_LOCALE",
    "ToolFailed",
    "find_tool",
    "run_tool",
    "stderr_tail",
    "tool_env",
    "write_atomic",
    "FIFREEZE",
    "FITHAW",
    "BackendError",
    "BackendInfo",
    "Cancel",
    "Cancelled",
    "Checkpoint",
    "CheckpointFailed",
    "Consistency",
    "DeadlineExceeded",
    "Deletion",
    "Export",
    "FrozenElsewhere",
    "Holder",
    "Image",
    "ImageEntry",
    "Keep",
    "Listed",
    "Manifest",
    "MissingTool",
    "Mount",
    "MountBusy",
    "MountRestored",
    "Option",
    "OptionKind",
    "Outcome",
    "Phase",
    "PluginError",
    "Plugins",
    "Policy",
    "PolicyError",
    "PruneReport",
    "Recovered",
    "Rescue",
    "RescueKind",
    "Restored",
    "Role",
    "Selection",
    "SnapcoreError",
    "StillNeeded",
    "Support",
    "Target",
    "TargetRecord",
    "TaskSpec",
    "ThawError",
    "UnsupportedMount",
    "Untrusted",
    "UsageError",
    "Verification",
    "__version__",
    "backend_options",
    "block_devnum",
    "check_policy",
    "checkpoint",
    "default_run_dir",
    "delete",
    "find_mount",
    "get_logger",
    "hold",
    "hookimpl",
    "human_bytes",
    "lazy_import",
    "list_checkpoints",
    "load_policy",
    "main",
    "make_plugins",
    "mount_holders",
    "plain_name",
    "plan",
    "prune",
    "read_regular",
    "recover",
    "restore",
    "show",
    "start_guard",
    "syncfs",
    "tied_to_controller",
    "udev_attr",
    "udev_device",
    "verify",
    "parse_size",
    "rehearse",
]
