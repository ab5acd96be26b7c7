"""A policy's backend options checked against the installed backends' schemas, and
each target's options resolved (its rule's own, over the defaults, over the backend's)."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from snapcore.errors import PolicyError, PolicyProblems
from snapcore.policy.model import Policy, Rule, did_you_mean, parse_duration
from snapcore.policy.parse import type_name
from snapcore.types import EMPTY, Option, OptionKind, Role

# -- validation against the installed backends ----------------------------------------


def _check_option(opt: Option, value: object) -> tuple[object, str | None]:
    if opt.kind is OptionKind.STR:
        return value, None if isinstance(value, str) else f"expected a string, got {type_name(value)}"
    if opt.kind is OptionKind.INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else f"expected an integer, got {type_name(value)}"
    if opt.kind is OptionKind.BOOL:
        return value, None if isinstance(value, bool) else f"expected true or false, got {type_name(value)}"
    if opt.kind is OptionKind.PATH:
        if isinstance(value, str) and value.startswith("/"):
            return posixpath.normpath(value), None
        return value, f"expected an absolute path, got {type_name(value)}"
    if opt.kind is OptionKind.DURATION:
        try:
            return parse_duration(value), None
        except ValueError as exc:
            return value, f"expected {exc}"
    if opt.kind is OptionKind.CHOICE:
        if value in opt.choices:
            return value, None
        hint = did_you_mean(value, opt.choices) if isinstance(value, str) else ""
        return value, f"expected one of {', '.join(opt.choices)}, got {type_name(value)}{hint}"
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
