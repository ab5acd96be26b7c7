"""Reading a policy file: strict, with line numbers.

Loading is strict: unknown keys, wrong types, duplicate keys, bad durations and
relative or overlapping mount paths are errors that name the file, the line, the
mount and the key, and say what was expected. The YAML is composed into nodes and
walked by hand (no object construction beyond scalars), with a budget on the
number of nodes visited, so an alias bomb is an error and not an outage.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from snapcore.errors import PolicyError, PolicyProblems
from snapcore.policy.model import (
    AUTO,
    CONTROL_CHARS,
    DEFAULT_DIGEST_LIMIT,
    DEFAULT_GHOST_LIMIT,
    DIGEST_ALL,
    FALLBACK,
    KEEP_KEYS,
    MAX_FREEZE_TIMEOUT,
    ON_CHANGE,
    RULE_KEYS,
    TOP_KEYS,
    UNCOVERED,
    Policy,
    Rule,
    YMap,
    YSeq,
    did_you_mean,
    parse_duration,
    parse_size,
    short,
)
from snapcore.types import EMPTY, Keep


class Problems:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[PolicyError] = []

    def add(self, message: str, *, line: int | None, mount: str | None = None, key: str | None = None) -> None:
        self.errors.append(PolicyError(message, file=self.file, line=line, mount=mount, key=key))

    def raise_if_any(self) -> None:
        if self.errors:
            raise PolicyProblems(self.errors)


def type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return f"the string {short(value)}"
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


def _check_keys(node: YMap, allowed: Sequence[str], p: Problems, mount: str | None, what: str) -> None:
    for key in node:
        if key not in allowed:
            p.add(
                f"unknown key in {what}{did_you_mean(key, allowed)}; expected one of {', '.join(allowed)}",
                line=node.lines[key],
                mount=mount,
                key=key,
            )


def _parse_rule(mount: str, node: object, line: int | None, base: Rule, p: Problems, what: str) -> Rule:
    if node is None:
        node = YMap()
        node.lines = {}
    if not isinstance(node, YMap):
        p.add(f"expected a mapping of settings, got {type_name(node)}", line=line, mount=mount)
        return base
    _check_keys(node, RULE_KEYS, p, mount, what)
    values: dict[str, Any] = {}
    lines = node.lines

    if "imager" in node:
        raw = node["imager"]
        names = [raw] if isinstance(raw, str) else raw
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            p.add(
                f"expected a backend name, a list of names (first usable wins) or 'auto', got {type_name(raw)}",
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
            p.add(f"expected a backend name, got {type_name(raw)}", line=lines["exporter"], mount=mount, key="exporter")
    if "required" in node:
        raw = node["required"]
        if isinstance(raw, bool):
            values["required"] = raw
        else:
            p.add(f"expected true or false, got {type_name(raw)}", line=lines["required"], mount=mount, key="required")
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
                f"expected one of {', '.join(ON_CHANGE)}, got {type_name(raw)}{hint}",
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
                f"expected a mapping of backend name to options, got {type_name(raw)}",
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
                        f"expected a mapping of options, got {type_name(opts)}",
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


def _parse_keep(mount: str, raw: object, line: int, p: Problems) -> Keep | None:
    if not isinstance(raw, YMap):
        p.add(
            f"expected a mapping such as {{last: 10}} or {{within: 7d}}, got {type_name(raw)}",
            line=line,
            mount=mount,
            key="keep",
        )
        return None
    _check_keys(raw, KEEP_KEYS, p, mount, "keep")
    last = raw.get("last")
    within = None
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 1):
        p.add(
            f"expected a whole number of at least 1, got {type_name(last)}",
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
    p = Problems(file)
    if doc is None:
        raise PolicyError("the policy is empty; it needs at least 'version: 1' and 'mounts'", file=file, line=1)
    if not isinstance(doc, YMap):
        line = doc.line if isinstance(doc, YSeq) else 1
        raise PolicyError(f"expected a mapping at the top, got {type_name(doc)}", file=file, line=line)
    _check_keys(doc, TOP_KEYS, p, None, "the policy")
    version = doc.get("version")
    if "version" not in doc:
        p.add("missing 'version: 1'", line=doc.line, key="version")
    elif version != 1 or not isinstance(version, int) or isinstance(version, bool):
        p.add(
            f"unsupported version {short(version)}: this snapcore reads version 1",
            line=doc.lines["version"],
            key="version",
        )
    uncovered = doc.get("uncovered", "warn")
    if uncovered not in UNCOVERED:
        p.add(f"expected one of {', '.join(UNCOVERED)}", line=doc.lines.get("uncovered"), key="uncovered")
        uncovered = "warn"
    ghost_limit = DEFAULT_GHOST_LIMIT
    if "ghost_limit" in doc:
        try:
            ghost_limit = parse_size(doc["ghost_limit"])
        except ValueError as exc:
            p.add(f"expected {exc}", line=doc.lines["ghost_limit"], key="ghost_limit")
    digest_limit = DEFAULT_DIGEST_LIMIT
    if "digest_limit" in doc:
        if doc["digest_limit"] == "all":
            digest_limit = DIGEST_ALL
        else:
            try:
                digest_limit = parse_size(doc["digest_limit"])
            except ValueError as exc:
                p.add(f"expected 'all' or {exc}", line=doc.lines["digest_limit"], key="digest_limit")
    state_dir = doc.get("state_dir")
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir.startswith("/")):
        p.add(f"expected an absolute path, got {type_name(state_dir)}", line=doc.lines["state_dir"], key="state_dir")
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
            f"expected a mapping of mount point to rule, got {type_name(mounts)}",
            line=doc.lines["mounts"],
            key="mounts",
        )
    else:
        first_line: dict[str, tuple[str, int]] = {}
        for key, value in mounts.items():
            line = mounts.lines[key]
            if re.search(CONTROL_CHARS, key):
                # the message is one line of a terminal: no newline or escape inside
                p.add(f"a mount point cannot contain control characters, got {short(key)}", line=line, key="mounts")
                continue
            if key != FALLBACK and not key.startswith("/"):
                p.add(
                    f'a mount point must be an absolute path or "*", got {short(key)}',
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
        digest_limit=digest_limit,
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
    from snapcore.policy.document import load_yaml  # PyYAML costs ~7 ms: only for a file

    doc, _ = load_yaml(file)
    return parse_policy(doc, file)
