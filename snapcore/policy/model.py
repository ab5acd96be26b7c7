"""The policy's model: rules keyed by mount point, their units (sizes, durations) and
defaults, and where the state directory is."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snapcore.types import EMPTY, Keep

MAX_POLICY_BYTES = 1 << 20
MAX_NODES = 20_000
#: Deeper YAML would exhaust the recursion of PyYAML's composer and of our walker.
MAX_DEPTH = 64
DEFAULT_STATE_DIR = "/var/lib/snapcore"
DEFAULT_FREEZE_TIMEOUT = 10.0
#: A frozen filesystem hangs every writer; past an hour it is an outage, and a huge
#: value overflows the watchdog's timer (threading's wait raises OverflowError).
MAX_FREEZE_TIMEOUT = 3600.0
#: What a change to a needed file under the frozen tasks does: fail the checkpoint,
#: become a warning, or also hold back (``delay``) or refuse (``deny``) the opens for
#: writing that would make one (fanotify permission events; the watch still fails).
ON_CHANGE = ("fail", "warn", "delay", "deny")
#: What tasks using a mount no rule covers do.
UNCOVERED = ("fail", "warn")
AUTO = "auto"
FALLBACK = "*"

RULE_KEYS = ("imager", "exporter", "options", "keep", "required", "freeze_timeout", "on_change")
TOP_KEYS = ("version", "state_dir", "ghost_limit", "digest_limit", "uncovered", "defaults", "mounts")
#: Default budget for ghost copies of files deleted or renamed over under the tasks (a policy's ``ghost_limit``).
DEFAULT_GHOST_LIMIT = 64 << 20
#: Largest file the tasks need whose sha256 is recorded (a policy's ``digest_limit``;
#: ``all``: every one). 16 MiB hashes in 10-30 ms here, before anything is frozen.
DEFAULT_DIGEST_LIMIT = 16 << 20
#: ``digest_limit: all``.
DIGEST_ALL = 1 << 62
# patterns as strings: the re module compiles (and caches) them on first use, so a
# checkpoint without a policy file never pays for them
#: A size, in a syntax both Python's and JSON Schema's (ECMA) regexes read.
SIZE_PATTERN = r"^\s*(\d+)\s*([KMGTkmgt]?)[iI]?[bB]?\s*$"


def parse_size(value: object) -> int:
    """``64M``, ``1G``, ``512KiB`` or a number of bytes → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(SIZE_PATTERN, value)
        if match:
            return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))
    raise ValueError(f"a size such as 64M, 1G or a number of bytes; got {value!r}")


KEEP_KEYS = ("last", "within")
#: A duration (as :data:`SIZE_PATTERN`, for both).
DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$"
CONTROL_CHARS = r"[\x00-\x1f\x7f-\x9f]"
_UNITS = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(value: object) -> float:
    """``10s``, ``500ms``, ``2m``, ``7d``, or a bare number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    seconds: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        # float(10**400) raises OverflowError; .inf and .nan are no durations either
        seconds = float(value) if not isinstance(value, int) or value < 10**300 else math.inf
    elif isinstance(value, str):
        match = re.fullmatch(DURATION_PATTERN, value)
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds is None:
        raise ValueError(f"a duration such as 10s, 500ms, 2m, 7d; got {short(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"a finite duration such as 10s, 500ms, 2m, 7d; got {short(value)}")
    return seconds


def short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib  # only on a mistake

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- documents with positions (parsed by snapcore.policy.document) ----------------------


class YMap(dict[str, Any]):
    """A mapping from the policy file that remembers where each key was."""

    line: int = 0
    lines: dict[str, int]


class YSeq(list[Any]):
    line: int = 0


# -- the policy model ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """What the policy says for one mount point (or ``*``)."""

    mount: str
    line: int | None = None
    imager: tuple[str, ...] = (AUTO,)
    exporter: str | None = None
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: EMPTY)
    option_lines: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    #: Line of each key of this rule, for messages about the key.
    key_lines: Mapping[str, int] = field(default_factory=lambda: EMPTY)
    #: Backends whose options this rule gives itself (the others come from ``defaults``).
    own_options: frozenset[str] = frozenset()
    keep: Keep | None = None
    required: bool = True
    freeze_timeout: float = DEFAULT_FREEZE_TIMEOUT
    on_change: str = "fail"

    @property
    def auto(self) -> bool:
        return self.imager == (AUTO,)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A loaded policy. ``Policy.default()`` is what paths without ``--policy`` get."""

    path: str | None
    version: int = 1
    state_dir: str | None = None
    rules: Mapping[str, Rule] = field(default_factory=lambda: EMPTY)
    fallback: Rule | None = None
    #: Bytes of deleted-but-open files copied into a checkpoint (ghost copies).
    ghost_limit: int = DEFAULT_GHOST_LIMIT
    #: Files the tasks need up to this size get a sha256 in the manifest.
    digest_limit: int = DEFAULT_DIGEST_LIMIT
    #: A mount the tasks use that no rule covers: ``warn`` (default) or ``fail``.
    uncovered: str = "warn"

    @classmethod
    def default(cls) -> Policy:
        return cls(path=None, fallback=Rule(mount=FALLBACK))

    def rule_for(self, mount_point: str) -> Rule | None:
        """The rule for a mount point: its own, else ``*``, else none (not covered)."""
        return self.rules.get(mount_point, self.fallback)

    @property
    def explicit_mounts(self) -> list[str]:
        return list(self.rules)


def state_dir_of(policy: Policy, override: str | None) -> Path:
    """``--state-dir`` / ``SNAPCORE_STATE_DIR`` beat the policy's ``state_dir``."""
    if override:
        return Path(override)
    env = os.environ.get("SNAPCORE_STATE_DIR")
    if env:
        return Path(env)
    return Path(policy.state_dir or DEFAULT_STATE_DIR)
