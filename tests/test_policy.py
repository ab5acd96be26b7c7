from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from snapcore.cli import main
from snapcore.errors import PolicyError, PolicyProblems
from snapcore.plugins import Plugins
from snapcore.policy import check_backends, load_policy, parse_duration

WritePolicy = Callable[..., Path]

GOOD = """\
version: 1
state_dir: /var/lib/snapcore
defaults:
  freeze_timeout: 10s
  on_change: fail
mounts:
  /srv/db:
    imager: fsfreeze
    options:
      fsfreeze: {sync: false}
    keep: {last: 10}
  /var/lib/app:
    imager: [fsfreeze, none]
    freeze_timeout: 500ms
  /scratch:
    required: false
  "*":
    imager: auto
"""


def test_good_policy(write_policy: WritePolicy, plugins: Plugins) -> None:
    policy = load_policy(write_policy(GOOD))
    assert set(policy.rules) == {"/srv/db", "/var/lib/app", "/scratch"}
    db = policy.rules["/srv/db"]
    assert db.imager == ("fsfreeze",)
    assert db.keep is not None and db.keep.last == 10
    assert db.freeze_timeout == 10.0
    assert policy.rules["/var/lib/app"].freeze_timeout == 0.5
    assert policy.rules["/var/lib/app"].imager == ("fsfreeze", "none")
    assert policy.rules["/scratch"].required is False
    assert policy.fallback is not None and policy.fallback.auto
    assert policy.rule_for("/elsewhere") is policy.fallback
    assert check_backends(policy, plugins) == []


def test_policy_check_cli_ok(write_policy: WritePolicy, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(GOOD)
    assert main(["policy", "check", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10s", 10), ("500ms", 0.5), ("2m", 120), ("1h", 3600), ("7d", 604800), (3, 3), ("1.5s", 1.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["10 parsecs", "-1s", "s", True, [1], None, -3])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


# Each bad policy: text, then what the error must say (line, mount, key, message).
BAD = {
    "syntax": ("version: 1\nmounts:\n  /a: {imager: [fsfreeze\n", ["YAML syntax error", "starts on line 3"]),
    "top-unknown": ("version: 1\nmount:\n  /a: {}\n", [":2", "'mount'", "did you mean 'mounts'"]),
    "rule-unknown": (
        "version: 1\nmounts:\n  /a:\n    imagr: fsfreeze\n",
        [":4", "mount /a", "'imagr'", "did you mean 'imager'"],
    ),
    "version": ("version: 2\nmounts: {}\n", [":1", "version", "unsupported version 2"]),
    "no-version": ("mounts:\n  /a: {}\n", ["'version'", "missing"]),
    "no-mounts": ("version: 1\n", ["'mounts'", "missing"]),
    "relative": ("version: 1\nmounts:\n  srv/db: {}\n", [":3", "absolute path"]),
    "overlap": ("version: 1\nmounts:\n  /srv/db: {}\n  /srv/db/: {}\n", [":4", "same mount point", "line 3"]),
    "duplicate": ("version: 1\nmounts:\n  /a: {}\n  /a: {}\n", [":4", "duplicate key '/a'", "line 3"]),
    "timeout-type": (
        "version: 1\nmounts:\n  /a:\n    freeze_timeout: soon\n",
        [":4", "mount /a", "'freeze_timeout'", "duration"],
    ),
    "timeout-zero": ("version: 1\nmounts:\n  /a:\n    freeze_timeout: 0s\n", [":4", "positive"]),
    "required-type": ("version: 1\nmounts:\n  /a:\n    required: maybe\n", [":4", "'required'", "true or false"]),
    "imager-type": ("version: 1\nmounts:\n  /a:\n    imager: 3\n", [":4", "'imager'", "backend name"]),
    "imager-auto-list": ("version: 1\nmounts:\n  /a:\n    imager: [auto, fsfreeze]\n", ["'auto' cannot"]),
    "on-change": ("version: 1\nmounts:\n  /a:\n    on_change: explode\n", [":4", "fail, warn, delay, deny"]),
    "keep-type": ("version: 1\nmounts:\n  /a:\n    keep: 5\n", [":4", "'keep'", "last: 10"]),
    "keep-last": ("version: 1\nmounts:\n  /a:\n    keep: {last: 0}\n", ["keep.last", "at least 1"]),
    "keep-empty": ("version: 1\nmounts:\n  /a:\n    keep: {}\n", ["'keep'", "needs 'last'"]),
    "keep-unknown": ("version: 1\nmounts:\n  /a:\n    keep: {lats: 3}\n", ["'lats'", "did you mean 'last'"]),
    "rule-list": ("version: 1\nmounts:\n  /a: [1, 2]\n", [":3", "mapping of settings"]),
    "mounts-list": ("version: 1\nmounts: [/a]\n", [":2", "mapping of mount point"]),
    "top-list": ("- a\n- b\n", ["mapping at the top"]),
    "state-dir": ("version: 1\nstate_dir: relative\nmounts: {}\n", [":2", "'state_dir'", "absolute"]),
    "options-type": ("version: 1\nmounts:\n  /a:\n    options: [x]\n", [":4", "'options'"]),
    "merge": ("version: 1\nbase: &b {required: false}\nmounts:\n  /a:\n    <<: *b\n", ["merge keys"]),
    "non-string-key": ("version: 1\nmounts:\n  1: {}\n", [":3", "keys must be strings"]),
    "empty": ("", ["empty"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_policy_names_file_line_and_key(
    name: str, write_policy: WritePolicy, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = BAD[name]
    path = write_policy(text, name=f"{name}.yaml")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    # and through the CLI: exit 2, one line per problem, no traceback
    assert main(["policy", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(path) in err


def test_all_problems_are_collected(write_policy: WritePolicy) -> None:
    path = write_policy("version: 1\nmounts:\n  /a:\n    imagr: x\n    required: 3\n  b: {}\n")
    with pytest.raises(PolicyProblems) as info:
        load_policy(path)
    assert len(info.value.problems) == 3


def test_alias_bomb_is_refused(write_policy: WritePolicy) -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    lines.append("mounts: {}")
    with pytest.raises(PolicyError, match="alias bomb"):
        load_policy(write_policy("\n".join(lines) + "\n"))


def test_huge_file_is_refused(write_policy: WritePolicy) -> None:
    path = write_policy("version: 1\nmounts: {}\n" + "# padding\n" * 1_100_000)
    with pytest.raises(PolicyError, match="at most"):
        load_policy(path)


def test_non_utf8_is_refused(write_policy: WritePolicy) -> None:
    with pytest.raises(PolicyError, match="not UTF-8") as info:
        load_policy(write_policy(b"version: 1\nmounts:\n  /caf\xe9: {}\n"))
    assert info.value.line == 3


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match="no such file"):
        load_policy("/nonexistent/policy.yaml")


def test_directory_is_not_a_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="is a directory"):
        load_policy(tmp_path)


def test_a_fifo_in_place_of_the_policy_is_refused_at_once(tmp_path: Path) -> None:
    """Nobody writes to it: opening it for reading would block every command forever."""
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file") as info:
        load_policy(fifo)
    assert info.value.file == str(fifo)


def test_a_policy_is_never_read_through_a_symlink(write_policy: WritePolicy, tmp_path: Path) -> None:
    real = write_policy("version: 1\nmounts: {}\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    with pytest.raises(PolicyError, match="symbolic link"):
        load_policy(link)
    assert not load_policy(real).rules


BACKEND_PROBLEMS = {
    "unknown-imager": ("imager: fsfreez", ["'imager'", "unknown backend 'fsfreez'", "did you mean 'fsfreeze'"]),
    "unknown-exporter": ("exporter: nosuch", ["'exporter'", "unknown backend 'nosuch'"]),
    "imager-as-exporter": ("exporter: fsfreeze", ["not an exporter"]),
    "unknown-option": (
        "imager: fsfreeze\n    options:\n      fsfreeze: {snyc: true}",
        [":6", "options.fsfreeze.snyc", "did you mean 'sync'"],
    ),
    "option-type": ("imager: fsfreeze\n    options:\n      fsfreeze: {sync: 3}", [":6", "true or false"]),
    "unused-options": (
        "imager: none\n    options:\n      fsfreeze: {sync: true}",
        [":6", "options.fsfreeze", "does not use"],
    ),
    "options-unknown-backend": ("options:\n      nosuch: {a: 1}", [":5", "options.nosuch", "unknown backend"]),
}


@pytest.mark.parametrize("name", sorted(BACKEND_PROBLEMS))
def test_policy_against_backends(
    name: str, write_policy: WritePolicy, plugins: Plugins, capsys: pytest.CaptureFixture[str]
) -> None:
    body, expected = BACKEND_PROBLEMS[name]
    path = write_policy(f"version: 1\nmounts:\n  /srv/db:\n    {body}\n")
    problems = check_backends(load_policy(path), plugins)
    assert problems, name
    message = str(problems[0])
    assert str(path) in message and "mount /srv/db" in message
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert main(["policy", "check", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
