"""The tools admins use every day (issue 20 B2, B5): ``make install-admin`` installs
the command, the systemd units (scheduled checkpoints and pruning like snapper's
timeline and cleanup timers, the cluster agent), bash and zsh completion and
snapcore(8), all generated from the command line's own parser.

systemd is not running on these machines: the installed units are checked by
``systemd-analyze verify`` (which also finds their man page), and their ``ExecStart``
lines are run as systemd would run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapcore.testing import LoopFactory
from snapcore.testing.units import exec_start

ROOT = Path(__file__).resolve().parent.parent
UNITS = [
    "snapcore-checkpoint@.service",
    "snapcore-checkpoint@.timer",
    "snapcore-prune.service",
    "snapcore-prune.timer",
    "snapcore-agent.service",
]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``make install-admin`` into a prefix of the test's (as PREFIX=/usr/local would)."""
    if shutil.which("make") is None:
        pytest.skip("make is missing")
    where = tmp_path_factory.mktemp("prefix")
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install-admin", f"PREFIX={where}", f"VENV={Path(sys.prefix)}"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    yield where


def test_install_admin_puts_everything_under_the_prefix(prefix: Path) -> None:
    snapcore = prefix / "bin" / "snapcore"
    assert snapcore.is_symlink() and os.access(snapcore, os.X_OK)
    assert subprocess.run([str(snapcore), "--version"], capture_output=True, text=True, check=True).stdout.startswith(
        "snapcore "
    )
    for unit in UNITS:
        text = (prefix / "lib/systemd/system" / unit).read_text()
        assert "/usr/local/bin" not in text or str(prefix) == "/usr/local", unit
        if "ExecStart=" in text:
            assert f"ExecStart={snapcore} " in text, unit
    for path in ("share/bash-completion/completions/snapcore", "share/zsh/site-functions/_snapcore"):
        assert (prefix / path).stat().st_size > 1000, path
    assert (prefix / "share/man/man8/snapcore.8").read_text().startswith(".TH SNAPCORE")


def test_the_units_verify(prefix: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` of every unit (an instance for the templates), with
    snapcore(8) where their Documentation= points."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (systemd)")
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS:
        name = unit.replace("@.", "@nightly.")
        shutil.copy(prefix / "lib/systemd/system" / unit, units / name)
    env = {**os.environ, "MANPATH": str(prefix / "share/man")}
    names = sorted(p.name for p in units.iterdir())
    done = subprocess.run(["systemd-analyze", "verify", *names], cwd=units, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_the_timer_s_checkpoint_and_prune_services_run(
    prefix: Path, loop_fs: LoopFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``snapcore-checkpoint@nightly.service``'s command checkpoints with
    ``/etc/snapcore/nightly.yaml`` (here, a directory of the test's in its place);
    ``snapcore-prune.service``'s applies the policy's keep."""
    fs = loop_fs("ext4")
    etc = tmp_path / "etc-snapcore"
    etc.mkdir()
    (tmp_path / "exports").mkdir()
    (etc / "nightly.yaml").write_text(
        f"version: 1\nmounts:\n  {fs.mount_point}:\n    imager: fsfreeze\n    exporter: tar\n"
        f"    keep: {{last: 1}}\n    options:\n      tar: {{dest: {tmp_path / 'exports'}}}\n"
    )
    env = {**os.environ, "SNAPCORE_STATE_DIR": str(tmp_path / "state"), "SNAPCORE_RUN_DIR": str(tmp_path / "run")}
    env["SNAPCORE_PLUGINS"] = "fsfreeze,tar"
    argv = exec_start((prefix / "lib/systemd/system/snapcore-checkpoint@.service").read_text(), instance="nightly")
    assert argv[1:] == ["checkpoint", "--policy", "/etc/snapcore/nightly.yaml"], argv
    argv[-1] = str(etc / "nightly.yaml")
    for _ in range(2):
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    manifests = sorted((tmp_path / "state" / "checkpoints").iterdir())
    assert len(manifests) == 2
    newest = max(manifests, key=lambda m: json.loads((m / "manifest.json").read_text())["started"]).name
    prune = exec_start((prefix / "lib/systemd/system/snapcore-prune.service").read_text())
    assert prune[1:] == ["prune"], prune
    done = subprocess.run(prune, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    exports = sorted(p.name for p in (tmp_path / "exports").iterdir() if not p.name.startswith("."))
    assert [m.name for m in manifests if m.name in exports] == [newest], exports  # keep: last 1


def test_bash_completion_completes_commands_and_options(prefix: Path) -> None:
    script = prefix / "share/bash-completion/completions/snapcore"

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        code = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
            f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; '
            f'_shtab_snapcore snapcore "{words[-1]}" "{words[-2]}"; printf "%s\\n" "${{COMPREPLY[@]}}"'
        )
        return subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True).stdout.split()

    assert complete("snapcore", "chec") == ["checkpoint", "check-files"]
    assert {"--etcd", "--node", "--lease"} <= set(complete("snapcore", "agent", "--"))
    assert "--cluster" in complete("snapcore", "restore", "--cl")


def test_zsh_completion_is_valid_zsh(prefix: Path) -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is missing (make setup installs it)")
    script = prefix / "share/zsh/site-functions/_snapcore"
    assert script.read_text().startswith("#compdef snapcore")
    done = subprocess.run(["zsh", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_man_page_renders_every_command(prefix: Path) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is missing (man-db)")
    page = prefix / "share/man/man8/snapcore.8"
    done = subprocess.run(
        ["man", "-l", "-P", "cat", str(page)], capture_output=True, text=True, env={**os.environ, "MANWIDTH": "100"}
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr  # troff said nothing
    from snapcore.cli.commands import COMMANDS

    for command in COMMANDS:
        assert f"snapcore {command}" in done.stdout, command
    for section in ("NAME", "SYNOPSIS", "FILES", "SEE ALSO"):
        assert f"\n{section}\n" in done.stdout, section
