"""The admin's YAML policy: rules keyed by mount point, validated with line numbers.

Loading is strict: unknown keys, wrong types, duplicate keys, bad durations and
relative or overlapping mount paths are errors that name the file, the line, the
mount and the key, and say what was expected. The YAML is composed into nodes and
walked by hand (no object construction beyond scalars), with a budget on the
number of nodes visited, so an alias bomb is an error and not an outage.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from snapcore.errors import PolicyError, PolicyProblems
from snapcore.types import EMPTY, Keep, Option, OptionKind, Role

MAX_POLICY_BYTES = 1 << 20
MAX_NODES = 20_000
#: Deeper YAML would exhaust the recursion of PyYAML's composer and of our walker.
MAX_DEPTH = 64
DEFAULT_STATE_DIR = "/var/lib/snapcore"
DEFAULT_FREEZE_TIMEOUT = 10.0
#: A frozen filesystem hangs every writer; past an hour it is an outage, and a huge
#: value overflows the watchdog's timer (threading's wait raises OverflowError).
MAX_FREEZE_TIMEOUT = 3600.0
ON_CHANGE = ("fail", "warn")
AUTO = "auto"
FALLBACK = "*"

_RULE_KEYS = ("imager", "exporter", "options", "keep", "required", "freeze_timeout", "on_change")
_TOP_KEYS = ("version", "state_dir", "ghost_limit", "uncovered", "defaults", "mounts")
#: Default budget for ghost copies of files deleted or renamed over under the tasks (a policy's ``ghost_limit``).
DEFAULT_GHOST_LIMIT = 64 << 20
# patterns as strings: the re module compiles (and caches) them on first use, so a
# checkpoint without a policy file never pays for them
_SIZE = r"(?i)^\s*(\d+)\s*([KMGT]?)i?B?\s*$"


def parse_size(value: object) -> int:
    """``64M``, ``1G``, ``512KiB`` or a number of bytes → bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(_SIZE, value)
        if match:
            return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))
    raise ValueError(f"a size such as 64M, 1G or a number of bytes; got {value!r}")


_KEEP_KEYS = ("last", "within")
_DURATION = r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$"
_CONTROL = r"[\x00-\x1f\x7f-\x9f]"
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
        match = re.fullmatch(_DURATION, value)
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds is None:
        raise ValueError(f"a duration such as 10s, 500ms, 2m, 7d; got {_short(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"a finite duration such as 10s, 500ms, 2m, 7d; got {_short(value)}")
    return seconds


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut short: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    import difflib  # only on a mistake

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- documents with positions (parsed by snapcore.policy_yaml) ----------------------


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


class _Problems:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[PolicyError] = []

    def add(self, message: str, *, line: int | None, mount: str | None = None, key: str | None = None) -> None:
        self.errors.append(PolicyError(message, file=self.file, line=line, mount=mount, key=key))

    def raise_if_any(self) -> None:
        if self.errors:
            raise PolicyProblems(self.errors)


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a mapping" if value else "an empty mapping"
    return type(value).__name__


def normalize_mount_key(key: str) -> str:
    if key == FALLBACK:
        return key
    norm = posixpath.normpath(key)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


def _check_keys(node: YMap, allowed: Sequence[str], p: _Problems, mount: str | None, what: str) -> None:
    for key in node:
        if key not in allowed:
            p.add(
                f"unknown key in {what}{did_you_mean(key, allowed)}; expected one of {', '.join(allowed)}",
                line=node.lines[key],
                mount=mount,
                key=key,
            )


def _parse_rule(mount: str, node: object, line: int | None, base: Rule, p: _Problems, what: str) -> Rule:
    if node is None:
        node = YMap()
        node.lines = {}
    if not isinstance(node, YMap):
        p.add(f"expected a mapping of settings, got {_type_name(node)}", line=line, mount=mount)
        return base
    _check_keys(node, _RULE_KEYS, p, mount, what)
    values: dict[str, Any] = {}
    lines = node.lines

    if "imager" in node:
        raw = node["imager"]
        names = [raw] if isinstance(raw, str) else raw
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            p.add(
                f"expected a backend name, a list of names (first usable wins) or 'auto', got {_type_name(raw)}",
                line=lines["imager"],
                mount=mount,
                key="imager",
            )
        elif AUTO in names and len(names) > 1:
            p.add("'auto' cannot be part of a list", line=lines["imager"], mount=mount, key="imager")
        else:
            values["imager"] = tuple(names)
    if "exporter" in node:
        raw = node["exporter"]
        if raw is None or raw == "none":
            values["exporter"] = None
        elif isinstance(raw, str) and raw:
            values["exporter"] = raw
        else:
            p.add(
                f"expected a backend name, got {_type_name(raw)}", line=lines["exporter"], mount=mount, key="exporter"
            )
    if "required" in node:
        raw = node["required"]
        if isinstance(raw, bool):
            values["required"] = raw
        else:
            p.add(f"expected true or false, got {_type_name(raw)}", line=lines["required"], mount=mount, key="required")
    if "freeze_timeout" in node:
        try:
            timeout = parse_duration(node["freeze_timeout"])
            if timeout <= 0:
                raise ValueError("a positive duration such as 10s or 500ms")
            if timeout > MAX_FREEZE_TIMEOUT:
                raise ValueError(f"at most {MAX_FREEZE_TIMEOUT:g}s (1h): a frozen filesystem hangs every writer")
            values["freeze_timeout"] = timeout
        except ValueError as exc:
            p.add(f"expected {exc}", line=lines["freeze_timeout"], mount=mount, key="freeze_timeout")
    if "on_change" in node:
        raw = node["on_change"]
        if raw in ON_CHANGE:
            values["on_change"] = raw
        else:
            hint = did_you_mean(raw, ON_CHANGE) if isinstance(raw, str) else ""
            p.add(
                f"expected one of {', '.join(ON_CHANGE)}, got {_type_name(raw)}{hint}",
                line=lines["on_change"],
                mount=mount,
                key="on_change",
            )
    if "keep" in node:
        values["keep"] = _parse_keep(mount, node["keep"], lines["keep"], p)
    if "options" in node:
        raw = node["options"]
        if raw is None:
            values["options"] = EMPTY
        elif not isinstance(raw, YMap):
            p.add(
                f"expected a mapping of backend name to options, got {_type_name(raw)}",
                line=lines["options"],
                mount=mount,
                key="options",
            )
        else:
            options: dict[str, Mapping[str, Any]] = {}
            option_lines: dict[str, int] = {}
            for backend, opts in raw.items():
                if opts is None:
                    opts = YMap()
                    opts.lines = {}
                if not isinstance(opts, YMap):
                    p.add(
                        f"expected a mapping of options, got {_type_name(opts)}",
                        line=raw.lines[backend],
                        mount=mount,
                        key=f"options.{backend}",
                    )
                    continue
                options[backend] = MappingProxyType(dict(opts))
                option_lines[backend] = raw.lines[backend]
                for key, key_line in opts.lines.items():
                    option_lines[f"{backend}.{key}"] = key_line
            # merged over the defaults, backend by backend and key by key
            merged = {b: MappingProxyType({**base.options.get(b, {}), **o}) for b, o in options.items()}
            values["options"] = MappingProxyType({**base.options, **merged})
            values["option_lines"] = MappingProxyType({**base.option_lines, **option_lines})
            values["own_options"] = frozenset(options)
    return Rule(
        mount=mount,
        line=line,
        imager=values.get("imager", base.imager),
        exporter=values.get("exporter", base.exporter),
        options=values.get("options", base.options),
        option_lines=values.get("option_lines", base.option_lines),
        key_lines=MappingProxyType(dict(lines)),
        own_options=values.get("own_options", frozenset()),
        keep=values.get("keep", base.keep),
        required=values.get("required", base.required),
        freeze_timeout=values.get("freeze_timeout", base.freeze_timeout),
        on_change=values.get("on_change", base.on_change),
    )


def _parse_keep(mount: str, raw: object, line: int, p: _Problems) -> Keep | None:
    if not isinstance(raw, YMap):
        p.add(
            f"expected a mapping such as {{last: 10}} or {{within: 7d}}, got {_type_name(raw)}",
            line=line,
            mount=mount,
            key="keep",
        )
        return None
    _check_keys(raw, _KEEP_KEYS, p, mount, "keep")
    last = raw.get("last")
    within = None
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        p.add(
            f"expected a whole number of at least 1, got {_type_name(last)}",
            line=raw.lines["last"],
            mount=mount,
            key="keep.last",
        )
        last = None
    if "within" in raw:
        try:
            within = parse_duration(raw["within"])
        except ValueError as exc:
            p.add(f"expected {exc}", line=raw.lines["within"], mount=mount, key="keep.within")
    if "last" not in raw and "within" not in raw:
        p.add("keep needs 'last', 'within' or both", line=line, mount=mount, key="keep")
    return Keep(last=last, within=within)


def parse_policy(doc: object, file: str) -> Policy:
    """Build a :class:`Policy` from a walked YAML document; collect every problem."""
    p = _Problems(file)
    if doc is None:
        raise PolicyError("the policy is empty; it needs at least 'version: 1' and 'mounts'", file=file, line=1)
    if not isinstance(doc, YMap):
        line = doc.line if isinstance(doc, YSeq) else 1
        raise PolicyError(f"expected a mapping at the top, got {_type_name(doc)}", file=file, line=line)
    _check_keys(doc, _TOP_KEYS, p, None, "the policy")
    version = doc.get("version")
    if "version" not in doc:
        p.add("missing 'version: 1'", line=doc.line, key="version")
    elif version != 1 or not isinstance(version, int) or isinstance(version, bool):
        p.add(
            f"unsupported version {_short(version)}: this snapcore reads version 1",
            line=doc.lines["version"],
            key="version",
        )
    uncovered = doc.get("uncovered", "warn")
    if uncovered not in ON_CHANGE:
        p.add(f"expected one of {', '.join(ON_CHANGE)}", line=doc.lines.get("uncovered"), key="uncovered")
        uncovered = "warn"
    ghost_limit = DEFAULT_GHOST_LIMIT
    if "ghost_limit" in doc:
        try:
            ghost_limit = parse_size(doc["ghost_limit"])
        except ValueError as exc:
            p.add(f"expected {exc}", line=doc.lines["ghost_limit"], key="ghost_limit")
    state_dir = doc.get("state_dir")
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir.startswith("/")):
        p.add(f"expected an absolute path, got {_type_name(state_dir)}", line=doc.lines["state_dir"], key="state_dir")
        state_dir = None
    defaults = Rule(mount=FALLBACK)
    if "defaults" in doc:
        start = len(p.errors)
        defaults = _parse_rule(FALLBACK, doc["defaults"], doc.lines["defaults"], defaults, p, "defaults")
        # the defaults are no mount: name the key under 'defaults', not "mount *"
        p.errors[start:] = [
            PolicyError(e.problem, file=e.file, line=e.line, key=f"defaults.{e.key}" if e.key else "defaults")
            for e in p.errors[start:]
        ]
        # the base of every rule: what ``defaults`` says, but no line or key of its own
        defaults = replace(defaults, mount=FALLBACK, line=None, key_lines=EMPTY, own_options=frozenset())
    rules: dict[str, Rule] = {}
    fallback: Rule | None = None
    mounts = doc.get("mounts")
    if "mounts" not in doc:
        p.add("missing 'mounts': the rules keyed by mount point", line=doc.line, key="mounts")
    elif not isinstance(mounts, YMap):
        p.add(
            f"expected a mapping of mount point to rule, got {_type_name(mounts)}",
            line=doc.lines["mounts"],
            key="mounts",
        )
    else:
        first_line: dict[str, tuple[str, int]] = {}
        for key, value in mounts.items():
            line = mounts.lines[key]
            if re.search(_CONTROL, key):
                # the message is one line of a terminal: no newline or escape inside
                p.add(f"a mount point cannot contain control characters, got {_short(key)}", line=line, key="mounts")
                continue
            if key != FALLBACK and not key.startswith("/"):
                p.add(
                    f'a mount point must be an absolute path or "*", got {_short(key)}',
                    line=line,
                    mount=key or None,
                    key="mounts",
                )
                continue
            norm = normalize_mount_key(key)
            if norm in first_line:
                other, other_line = first_line[norm]
                p.add(
                    f"{key!r} is the same mount point as {other!r} (line {other_line})",
                    line=line,
                    mount=norm,
                    key="mounts",
                )
                continue
            first_line[norm] = (key, line)
            rule = _parse_rule(norm, value, line, defaults, p, f"mount {norm}")
            if norm == FALLBACK:
                fallback = rule
            else:
                rules[norm] = rule
    p.raise_if_any()
    return Policy(
        path=file,
        version=1,
        state_dir=state_dir,
        rules=MappingProxyType(rules),
        fallback=fallback,
        ghost_limit=ghost_limit,
        uncovered=uncovered,
    )


def check_trusted(path: str, st: os.stat_result) -> None:
    """As root, refuse a policy someone else could have written (as sudo and sshd do):
    the file (``st``, from the descriptor it is read through) must belong to root or
    to us and be writable by nobody else."""
    if os.geteuid() != 0:
        return
    if st.st_uid not in (0, os.geteuid()):
        raise PolicyError(f"owned by uid {st.st_uid}, not root: refusing a policy another user controls", file=path)
    if st.st_mode & 0o022:
        raise PolicyError(
            f"writable by group or others (mode {st.st_mode & 0o777:o}): refusing it; chmod go-w {path}", file=path
        )


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load and structurally validate a policy file (no plugins needed)."""
    file = os.fspath(path)
    from snapcore.policy_yaml import load_yaml  # PyYAML costs ~7 ms: only for a file

    doc, _ = load_yaml(file)
    return parse_policy(doc, file)


# -- validation against the installed backends ----------------------------------------


def _check_option(opt: Option, value: object) -> tuple[object, str | None]:
    if opt.kind is OptionKind.STR:
        return value, None if isinstance(value, str) else f"expected a string, got {_type_name(value)}"
    if opt.kind is OptionKind.INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else f"expected an integer, got {_type_name(value)}"
    if opt.kind is OptionKind.BOOL:
        return value, None if isinstance(value, bool) else f"expected true or false, got {_type_name(value)}"
    if opt.kind is OptionKind.PATH:
        if isinstance(value, str) and value.startswith("/"):
            return posixpath.normpath(value), None
        return value, f"expected an absolute path, got {_type_name(value)}"
    if opt.kind is OptionKind.DURATION:
        try:
            return parse_duration(value), None
        except ValueError as exc:
            return value, f"expected {exc}"
    if opt.kind is OptionKind.CHOICE:
        if value in opt.choices:
            return value, None
        hint = did_you_mean(value, opt.choices) if isinstance(value, str) else ""
        return value, f"expected one of {', '.join(opt.choices)}, got {_type_name(value)}{hint}"
    return value, f"unknown option kind {opt.kind}"  # pragma: no cover


def validate_options(
    backend: str,
    schema: Sequence[Option],
    given: Mapping[str, Any],
    *,
    file: str | None,
    mount: str,
    lines: Mapping[str, int],
    default_line: int | None,
) -> tuple[dict[str, Any], list[PolicyError]]:
    """Check one backend's options against its schema; fill in defaults."""
    errors: list[PolicyError] = []
    by_name = {o.name: o for o in schema}
    result: dict[str, Any] = {}
    for key, value in given.items():
        line = lines.get(f"{backend}.{key}", default_line)
        opt = by_name.get(key)
        if opt is None:
            known = ", ".join(sorted(by_name)) or "none"
            errors.append(
                PolicyError(
                    f"unknown option{did_you_mean(key, by_name)}; {backend} takes: {known}",
                    file=file,
                    line=line,
                    mount=mount,
                    key=f"options.{backend}.{key}",
                )
            )
            continue
        checked, problem = _check_option(opt, value)
        if problem:
            errors.append(PolicyError(problem, file=file, line=line, mount=mount, key=f"options.{backend}.{key}"))
        result[key] = checked
    for opt in schema:
        if opt.name not in result:
            if opt.required and opt.name not in given:
                errors.append(
                    PolicyError(
                        f"missing required option ({opt.help})",
                        file=file,
                        line=lines.get(backend, default_line),
                        mount=mount,
                        key=f"options.{backend}.{opt.name}",
                    )
                )
            else:
                result[opt.name] = opt.default
    return result, errors


def check_backends(policy: Policy, plugins: Any) -> list[PolicyError]:
    """Every problem of ``policy`` against the installed backends (``plugins``)."""
    from snapcore.plugins import Plugins

    assert isinstance(plugins, Plugins)
    errors: list[PolicyError] = []
    rules = list(policy.rules.values()) + ([policy.fallback] if policy.fallback else [])
    for rule in rules:
        errors.extend(rule_problems(policy, rule, plugins))
    return errors


def rule_problems(policy: Policy, rule: Rule, plugins: Any) -> list[PolicyError]:
    errors: list[PolicyError] = []
    file = policy.path

    def err(msg: str, key: str) -> None:
        line = rule.key_lines.get(key, rule.line)
        errors.append(PolicyError(msg, file=file, line=line, mount=rule.mount, key=key))

    used: list[str] = []
    if not rule.auto:
        for name in rule.imager:
            if name not in plugins.backends:
                err(plugins.unknown_message(name) + did_you_mean(name, plugins.names()), "imager")
            elif Role.IMAGER not in plugins.info(name).roles:
                err(f"backend {name!r} is not an imager (imagers: {', '.join(plugins.names(Role.IMAGER))})", "imager")
            else:
                used.append(name)
    if rule.exporter is not None:
        name = rule.exporter
        if name not in plugins.backends:
            err(plugins.unknown_message(name) + did_you_mean(name, plugins.names()), "exporter")
        elif Role.EXPORTER not in plugins.info(name).roles:
            exporters = ", ".join(plugins.names(Role.EXPORTER)) or "none installed"
            err(f"backend {name!r} is not an exporter (exporters: {exporters})", "exporter")
        else:
            used.append(name)
    for backend, opts in rule.options.items():
        if backend not in plugins.backends:
            errors.append(
                PolicyError(
                    plugins.unknown_message(backend) + did_you_mean(backend, plugins.names()),
                    file=file,
                    line=rule.option_lines.get(backend, rule.line),
                    mount=rule.mount,
                    key=f"options.{backend}",
                )
            )
            continue
        if not rule.auto and backend not in used:
            if backend not in rule.own_options:
                continue  # a default for backends some mounts use: not this one's business
            errors.append(
                PolicyError(
                    f"options for {backend!r}, which this mount does not use "
                    f"(imager: {', '.join(rule.imager)}; exporter: {rule.exporter or 'none'})",
                    file=file,
                    line=rule.option_lines.get(backend, rule.line),
                    mount=rule.mount,
                    key=f"options.{backend}",
                )
            )
            continue
        _, problems = validate_options(
            backend,
            plugins.option_schema(backend),
            opts,
            file=file,
            mount=rule.mount,
            lines=rule.option_lines,
            default_line=rule.line,
        )
        errors.extend(problems)
    # a used backend with required options that the rule does not give at all
    for backend in used:
        if backend not in rule.options:
            _, problems = validate_options(
                backend,
                plugins.option_schema(backend),
                {},
                file=file,
                mount=rule.mount,
                lines=rule.option_lines,
                default_line=rule.line,
            )
            errors.extend(problems)
    return errors


def resolved_options(policy: Policy, rule: Rule, backends: Iterable[str], plugins: Any) -> dict[str, Mapping[str, Any]]:
    """The validated options (defaults filled in) of the given backends for ``rule``."""
    result: dict[str, Mapping[str, Any]] = {}
    for backend in backends:
        values, problems = validate_options(
            backend,
            plugins.option_schema(backend),
            rule.options.get(backend, EMPTY),
            file=policy.path,
            mount=rule.mount,
            lines=rule.option_lines,
            default_line=rule.line,
        )
        if problems:
            raise PolicyProblems(problems)
        result[backend] = MappingProxyType(values)
    return result


def state_dir_of(policy: Policy, override: str | None) -> Path:
    """``--state-dir`` / ``SNAPCORE_STATE_DIR`` beat the policy's ``state_dir``."""
    if override:
        return Path(override)
    env = os.environ.get("SNAPCORE_STATE_DIR")
    if env:
        return Path(env)
    return Path(policy.state_dir or DEFAULT_STATE_DIR)
