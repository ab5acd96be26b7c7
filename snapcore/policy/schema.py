"""The policy as a JSON Schema (draft 2020-12), for editors: ``snapcore policy schema``
prints it, and a YAML language server (``# yaml-language-server: $schema=FILE``)
completes and checks policy files with it.

It is built from what the loader checks with (:mod:`snapcore.policy.model`'s key
lists, choices, the duration and size patterns, the freeze-timeout bounds) and from
every installed backend's roles and option schema (``snapcore_option_schema``), so a
new key or backend option appears in it by itself. What a schema cannot say (a
duplicate key, an alias, two spellings of one mount point, a duration string over an
hour) stays the loader's alone; ``tests/test_policy_schema.py`` lists those cases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from snapcore.policy.model import (
    AUTO,
    CONTROL_CHARS,
    DURATION_PATTERN,
    FALLBACK,
    KEEP_KEYS,
    MAX_FREEZE_TIMEOUT,
    ON_CHANGE,
    RULE_KEYS,
    SIZE_PATTERN,
    TOP_KEYS,
    UNCOVERED,
)
from snapcore.types import Option, OptionKind, Role

if TYPE_CHECKING:
    from snapcore.plugins import Plugins

SCHEMA_ID = "https://snapcore.invalid/policy-v1.schema.json"

DURATION: dict[str, Any] = {
    "description": "a duration: 10s, 500ms, 2m, 1h, 7d, 1w, or a number of seconds",
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": DURATION_PATTERN}],
}
SIZE: dict[str, Any] = {
    "description": "a size: 64M, 1G, 512KiB, or a number of bytes",
    "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": SIZE_PATTERN}],
}
#: The control characters' ranges, as JSON Schema's (ECMA) regexes write them.
_CONTROL_RANGES = CONTROL_CHARS[1:-1].replace("\\x", "\\u00")


def _option(opt: Option) -> dict[str, Any]:
    kinds: dict[OptionKind, dict[str, Any]] = {
        OptionKind.STR: {"type": "string"},
        OptionKind.INT: {"type": "integer"},
        OptionKind.BOOL: {"type": "boolean"},
        OptionKind.PATH: {"type": "string", "pattern": "^/"},
        OptionKind.DURATION: dict(DURATION),
        OptionKind.CHOICE: {"enum": list(opt.choices)},
    }
    schema = {**kinds[opt.kind], "description": opt.help}
    if opt.default is not None:
        schema["default"] = opt.default
    return schema


def _backend_options(options: tuple[Option, ...]) -> dict[str, Any]:
    return {
        "type": ["object", "null"],
        "properties": {o.name: _option(o) for o in options},
        "additionalProperties": False,
    }


def _rule(plugins: Plugins) -> dict[str, Any]:
    imagers, exporters = plugins.names(Role.IMAGER), plugins.names(Role.EXPORTER)
    imager = {"enum": imagers}
    properties: dict[str, Any] = {
        "imager": {
            "description": "the backend that freezes and images the mount: a name, a list (the first usable wins) "
            "or 'auto'",
            "anyOf": [{"const": AUTO}, imager, {"type": "array", "items": imager, "minItems": 1}],
        },
        "exporter": {
            "description": "the backend that copies the image elsewhere (none: no copy)",
            "anyOf": [{"type": "null"}, {"const": "none"}, {"enum": exporters}],
        },
        "options": {
            "description": "per backend, its options",
            "type": ["object", "null"],
            "properties": {name: _backend_options(tuple(plugins.option_schema(name))) for name in plugins.names()},
            "additionalProperties": False,
        },
        "keep": {
            "description": "retention: the newest 'last' checkpoints and/or those 'within' a duration",
            "type": "object",
            "properties": {"last": {"type": "integer", "minimum": 1}, "within": DURATION},
            "additionalProperties": False,
            "minProperties": 1,
        },
        "required": {"description": "fail the checkpoint when this mount cannot be imaged", "type": "boolean"},
        "freeze_timeout": {
            "description": f"the longest the mount may stay frozen (at most {MAX_FREEZE_TIMEOUT:g}s)",
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_FREEZE_TIMEOUT},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
        },
        "on_change": {
            "description": "a needed file changed under the frozen tasks: fail, warn, or also hold back (delay) "
            "or refuse (deny) opens of it for writing",
            "enum": list(ON_CHANGE),
        },
    }
    assert set(properties) == set(RULE_KEYS), "a rule key without its schema"
    assert set(properties["keep"]["properties"]) == set(KEEP_KEYS)
    return {"type": ["object", "null"], "properties": properties, "additionalProperties": False}


def policy_schema(plugins: Plugins) -> dict[str, Any]:
    """The JSON Schema of a version-1 policy, with these plugins' backends."""
    rule = _rule(plugins)
    properties: dict[str, Any] = {
        "version": {"type": "integer", "const": 1},
        "state_dir": {"description": "where manifests go", "type": "string", "pattern": "^/"},
        "ghost_limit": {**SIZE, "description": "the largest deleted-but-open file copied"},
        "digest_limit": {"description": "the largest file hashed, or 'all'", "anyOf": [{"const": "all"}, SIZE]},
        "uncovered": {"description": "tasks use a mount no rule covers", "enum": list(UNCOVERED)},
        "defaults": {**rule, "description": "what every rule starts from"},
        "mounts": {
            "description": f"the rules, by mount point (absolute) or {FALLBACK!r} for every other",
            "type": "object",
            "propertyNames": {"pattern": f"^(/[^{_CONTROL_RANGES}]*|\\{FALLBACK})$"},
            "additionalProperties": rule,
        },
    }
    assert set(properties) == set(TOP_KEYS), "a top-level key without its schema"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "snapcore policy",
        "type": "object",
        "required": ["version", "mounts"],
        "properties": properties,
        "additionalProperties": False,
    }
