"""systemd units in tests (systemd does not run on these machines): a unit's
``ExecStart`` as systemd would run it, to be run by the test."""

from __future__ import annotations

from collections.abc import Mapping


def exec_start(unit: str, env: Mapping[str, str] | None = None, instance: str = "") -> list[str]:
    """``unit``'s (its text) ExecStart as systemd runs it: ``%i`` the instance,
    ``${X}`` one word of ``env``, ``$X`` split on whitespace."""
    [line] = [x[len("ExecStart=") :] for x in unit.splitlines() if x.startswith("ExecStart=")]
    env = env or {}
    argv: list[str] = []
    for word in line.replace("%i", instance).split():
        if word.startswith("${") and word.endswith("}"):
            argv.append(env[word[2:-1]])
        elif word.startswith("$"):
            argv.extend(env[word[1:]].split())
        else:
            argv.append(word)
    return argv
