"""The admin's YAML policy: rules keyed by mount point, validated with line numbers.

:mod:`.model` (rules, units, defaults), :mod:`.document` (the YAML read as nodes with
positions, within budgets), :mod:`.parse` (strict checking, the trust check, loading)
and :mod:`.options` (backend options against the installed backends' schemas). The
names below are what the rest of snapcore uses.
"""

from __future__ import annotations

from snapcore.errors import PolicyProblems
from snapcore.policy.model import (
    AUTO,
    DEFAULT_FREEZE_TIMEOUT,
    DEFAULT_GHOST_LIMIT,
    DEFAULT_STATE_DIR,
    FALLBACK,
    MAX_FREEZE_TIMEOUT,
    MAX_POLICY_BYTES,
    Policy,
    Rule,
    parse_duration,
    parse_size,
    state_dir_of,
)
from snapcore.policy.options import check_backends, resolved_options, rule_problems, validate_options
from snapcore.policy.parse import check_trusted, load_policy, normalize_mount_key, parse_policy

__all__ = [
    "AUTO",
    "DEFAULT_FREEZE_TIMEOUT",
    "DEFAULT_GHOST_LIMIT",
    "DEFAULT_STATE_DIR",
    "FALLBACK",
    "MAX_FREEZE_TIMEOUT",
    "MAX_POLICY_BYTES",
    "Policy",
    "PolicyProblems",
    "Rule",
    "check_backends",
    "check_trusted",
    "load_policy",
    "normalize_mount_key",
    "parse_duration",
    "parse_policy",
    "parse_size",
    "resolved_options",
    "rule_problems",
    "state_dir_of",
    "validate_options",
]
