"""The bad-input corpus: every file under ``tests/policies/bad/`` is a policy that
``snapcore policy check`` must refuse with exit 2 and a one-line message per problem
that names the file and the line, and says what the file states it must say.

A file states its expectation on its first line, ``# expect: :4 | mount /srv/db |
'imagr'`` (fragments separated by `` | ``; ``:N`` means "the file's own path, line
N"). A file that cannot carry a comment (empty, not UTF-8, binary) has a sidecar
``NAME.expect`` with that line. ``NAME.gen`` is a recipe for a file too large to keep
in the repository: the test writes it into ``tmp_path``.

Each file runs through the real command in its own process (``python -m snapcore``,
with only the core's backends and fsfreeze); the processes run in parallel so the
whole corpus takes seconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from snapcore.errors import PolicyError, PolicyProblems
from snapcore.plugins import Plugins
from snapcore.policy import MAX_POLICY_BYTES, check_backends, load_policy
from snapcore.testing import machine_pace

BAD = Path(__file__).parent / "policies" / "bad"
POLICIES = sorted(p for p in BAD.iterdir() if p.suffix == ".yaml")
RECIPES = sorted(BAD.glob("*.gen"))
HUGE_BYTES = 10 * 1024 * 1024
TIMEOUT_S = 30


def expectation(path: Path) -> list[str]:
    """The fragments the error about ``path`` must contain (from the file or its sidecar)."""
    sidecar = path.with_suffix(".expect")
    source = sidecar if sidecar.exists() else path
    first = source.read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace")
    match = re.fullmatch(r"# expect: (.+)", first)
    assert match, f"{source}: the first line must be '# expect: fragment | fragment ...'"
    return [fragment.strip() for fragment in match.group(1).split(" | ")]


def generate(recipe: Path, into: Path) -> Path:
    """The policy a ``.gen`` recipe describes (its text, padded to 10 MB), written once."""
    path = into / recipe.with_suffix(".yaml").name
    if path.exists():  # a process of corpus_runs may be reading it: never rewrite it
        return path
    head = recipe.read_bytes()
    line = b"# padding to make a policy far larger than any real one\n"
    count = (HUGE_BYTES - len(head)) // len(line)
    path.write_bytes(head + line * count + b"\n" * (HUGE_BYTES - len(head) - len(line) * count))
    assert path.stat().st_size == HUGE_BYTES
    return path


def _check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapcore", "policy", "check", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        env=env,
        timeout=machine_pace().seconds(TIMEOUT_S),
        check=False,
    )


@pytest.fixture(scope="module")
def huge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("huge")


@pytest.fixture(scope="module")
def corpus_runs(huge_dir: Path) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """One ``snapcore policy check`` process per corpus file, started in parallel."""
    paths = {name: _resolve(source, huge_dir) for name, source in _cases()}
    # the environment copied here, once: pytest changes os.environ (PYTEST_CURRENT_TEST)
    # while the pool's threads run, and a thread copying it then raised KeyError (proof q)
    env = {**os.environ, "SNAPCORE_PLUGINS": "fsfreeze"}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        yield {name: pool.submit(_check, path, env) for name, path in paths.items()}


def _assert_message(path: Path, text: str, expected: list[str]) -> None:
    for fragment in expected:
        if re.fullmatch(r":\d+", fragment):
            # the file's path and this line, e.g. ".../mount-relative.yaml:4,"
            assert re.search(re.escape(f"{path}{fragment}") + r"\b", text), (fragment, text)
        else:
            assert fragment in text, (fragment, text)


def _cases() -> list[tuple[str, Path]]:
    return [(p.stem, p) for p in POLICIES] + [(r.stem, r) for r in RECIPES]


def _resolve(source: Path, huge_dir: Path) -> Path:
    return generate(source, huge_dir) if source.suffix == ".gen" else source


def test_the_corpus_is_large_enough() -> None:
    assert len(_cases()) >= 40
    orphans = [e for e in BAD.glob("*.expect") if not e.with_suffix(".yaml").exists()]
    assert not orphans, f"sidecars without a policy: {orphans}"


@pytest.mark.parametrize(("name", "source"), _cases(), ids=[name for name, _ in _cases()])
def test_cli_refuses(
    name: str,
    source: Path,
    huge_dir: Path,
    corpus_runs: dict[str, Future[subprocess.CompletedProcess[str]]],
) -> None:
    expected = expectation(source)
    path = _resolve(source, huge_dir)
    result = corpus_runs[name].result()
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines, "no message"
    # one line per problem, each naming the file and a line in it
    for line in lines:
        assert re.match(re.escape(f"snapcore: error: {path}:") + r"\d+\b", line), line
    _assert_message(path, result.stderr, expected)


@pytest.mark.parametrize(("name", "source"), _cases(), ids=[name for name, _ in _cases()])
def test_api_refuses(name: str, source: Path, huge_dir: Path, plugins: Plugins) -> None:
    """``load_policy`` raises, or ``check_backends`` returns, ``PolicyError``s only."""
    expected = expectation(source)
    path = _resolve(source, huge_dir)
    try:
        policy = load_policy(path)
    except PolicyProblems as exc:
        problems: list[PolicyError] = exc.problems
    except PolicyError as exc:
        problems = [exc]
    else:
        problems = check_backends(policy, plugins)
    assert problems, f"{name}: accepted"
    assert all(type(p) is PolicyError for p in problems), problems
    assert all(p.file == str(path) and p.line is not None for p in problems), [str(p) for p in problems]
    _assert_message(path, "\n".join(str(p) for p in problems), expected)


def test_huge_file_names_the_line_at_the_limit(huge_dir: Path) -> None:
    assert RECIPES, "the huge-file recipe is missing"
    path = generate(RECIPES[0], huge_dir)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.line is not None
    # the limit falls on the line the message names
    assert info.value.line == path.read_bytes()[:MAX_POLICY_BYTES].count(b"\n") + 1


GOOD = """\
version: 1
mounts:
  /srv/db:
    imager: fsfreeze
    options:
      fsfreeze: {sync: false}
  "*":
    imager: auto
"""


def test_a_good_policy_passes_the_same_way(tmp_path: Path) -> None:
    """The harness can fail: a good policy exits 0 through the same command."""
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = _check(path, {**os.environ, "SNAPCORE_PLUGINS": "fsfreeze"})
    assert (result.returncode, result.stderr) == (0, "")
    assert "OK" in result.stdout
