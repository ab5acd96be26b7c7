"""Property tests of the policy loader: whatever the bytes, ``load_policy`` returns a
``Policy`` or raises ``PolicyError`` (never another exception, never a hang), and
``check_backends`` on what it returns gives a list of ``PolicyError``.

Three kinds of input: near-valid policies built as data and dumped as YAML, the same
with random edits (YAML punctuation, tags, anchors, tabs, bad bytes spliced in), and
raw text or bytes. ``derandomize=True`` keeps CI stable; the bad-input corpus in
``tests/policies/bad`` holds the cases this found.
"""

from __future__ import annotations

import math
import signal
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from snapcore.errors import PolicyError, PolicyProblems
from snapcore.plugins import Plugins
from snapcore.policy import MAX_FREEZE_TIMEOUT, Policy, check_backends, load_policy, normalize_mount_key
from snapcore.testing import machine_pace, plugins_named

# -- strategies ------------------------------------------------------------------------

BACKENDS = ["fsfreeze", "none", "auto", "fsfreez", "tar", "rsync", "btrfs", "", "FSFREEZE"]
DURATIONS = ["10s", "500ms", "2m", "1h", "7d", "0s", "-1s", "1.5s", "soon", "10 parsecs", ".inf", "2h", "1e3s", " 3 s "]
MOUNTS = ["/srv/db", "/srv/db/", "/srv//db", "//srv/db", "/srv/./db", "/", "*", "srv/db", "", "~", "/srv/db/.."]
NASTY = [
    "&a ", "*a", "*b", "<<: *a\n", "<<", "!!python/object:os.system ", "!!set ", "!!omap ", "!!binary ",
    "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!str ", "!foo ", "\t", "? ", "- ", "{", "}", "[", "]",
    ": ", ":", ",", "#", "'", '"', "|\n", ">-\n", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n",
    "\x00", "\x07", "\u2028", "\ufeff", "\xe9", "2024-13-45", "0x_", "0b_", ".nan", ".inf", "~", "=", "\n", "  ",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**310),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(BACKENDS + DURATIONS + MOUNTS + ["fail", "warn", "fial", "/var/lib/snapcore"]),
)


def keys(valid: list[str]) -> st.SearchStrategy[str]:
    """Mostly the valid keys, sometimes a typo of one, sometimes anything."""
    typo = st.sampled_from(valid).flatmap(
        lambda k: st.sampled_from([k[:-1], k + "s", k.replace("_", ""), k.upper(), k[1:]])
    )
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), typo, st.text(max_size=6))


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The value the key wants, or a scalar of any type, or a list or mapping of them."""
    return st.one_of(
        strategy,
        strategy,
        scalars,
        st.lists(scalars, max_size=3),
        st.dictionaries(st.text(max_size=4), scalars, max_size=2),
    )


backend = st.sampled_from(BACKENDS)
options = st.dictionaries(
    backend,
    maybe(st.dictionaries(keys(["sync", "dest", "compress"]), maybe(st.booleans()), max_size=3)),
    max_size=3,
)
keep = st.dictionaries(keys(["last", "within"]), maybe(st.one_of(st.integers(-1, 20), st.sampled_from(DURATIONS))))
rule = st.dictionaries(
    keys(["imager", "exporter", "options", "keep", "required", "freeze_timeout", "on_change"]),
    st.deferred(
        lambda: st.one_of(
            maybe(backend),
            st.lists(backend, max_size=3),
            maybe(options),
            maybe(keep),
            maybe(st.sampled_from(DURATIONS)),
            maybe(st.sampled_from(["fail", "warn"])),
        )
    ),
    max_size=5,
)
mounts = st.dictionaries(st.one_of(st.sampled_from(MOUNTS), st.text(max_size=10)), maybe(rule), max_size=4)
documents = st.dictionaries(
    keys(["version", "state_dir", "defaults", "mounts"]),
    st.one_of(maybe(st.just(1)), maybe(st.sampled_from(["/var/lib/snapcore", "var/lib"])), maybe(rule), mounts),
    max_size=5,
)


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A generated policy, dumped as YAML in block or flow style."""
    doc = draw(documents)
    if draw(st.booleans()):
        doc.setdefault("version", 1)
        doc.setdefault("mounts", {"/srv/db": {"imager": "fsfreeze"}})
    text = yaml.safe_dump(doc, default_flow_style=draw(st.booleans()), sort_keys=False, allow_unicode=True)
    return text.encode("utf-8")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A near-valid policy with a few random edits: splices, deletions, repeated lines."""
    data = bytearray(draw(near_valid()))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "duplicate-line", "bytes"]))
        if op == "insert":
            data[at:at] = draw(st.sampled_from(NASTY)).encode("utf-8")
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "duplicate-line":
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            end = len(data) if end < 0 else end + 1
            data[end:end] = data[start:end]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@st.composite
def alias_bombs(draw: st.DrawFn) -> bytes:
    """Billion laughs of random width and depth, and deep flow nesting."""
    width, depth = draw(st.integers(2, 12)), draw(st.integers(1, 9))
    lines = ["version: 1", "a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, depth + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    nest = draw(st.integers(0, 300))
    lines.append("mounts: " + "[" * nest + "]" * nest if nest else "mounts: {}")
    return ("\n".join(lines) + "\n").encode()


YAMLISH = st.lists(st.sampled_from([*"abv/1: \n-[]{},&*!#'\"\t?|>%@`", "version", "mounts", "\n  "])).map("".join)
inputs = st.one_of(
    near_valid(),
    mutated(),
    mutated(),
    alias_bombs(),
    YAMLISH.map(lambda s: s.encode("utf-8")),
    st.text().map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
)

# -- the property ----------------------------------------------------------------------

HANG_S = 10  # a hard stop: the hypothesis deadline only reports slowness afterwards


@pytest.fixture(scope="module")
def fuzz_plugins() -> Plugins:
    return plugins_named("fsfreeze")


@pytest.fixture(scope="module")
def policy_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="snapcore-fuzz-") as tmp:
        yield Path(tmp) / "policy.yaml"


def _hang_s() -> int:
    """:data:`HANG_S` on this machine (whole seconds, for ``signal.alarm``)."""
    return math.ceil(machine_pace().seconds(HANG_S))


def _hang(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError(f"the policy loader ran for more than {_hang_s()}s")


def _assert_one_line(errors: list[PolicyError], path: Path) -> None:
    for error in errors:
        assert type(error) is PolicyError, repr(error)
        message = str(error)
        assert "\n" not in message and "\r" not in message, message
        assert error.file == str(path), message
        assert error.line is not None, message


def _assert_sane(policy: Policy) -> None:
    """What a loaded policy promises the rest of the core."""
    rules = [*policy.rules.values(), *([policy.fallback] if policy.fallback else [])]
    for mount, rule in policy.rules.items():
        assert mount.startswith("/") and normalize_mount_key(mount) == mount == rule.mount
    for rule in rules:
        assert rule.imager and all(isinstance(name, str) and name for name in rule.imager)
        assert rule.exporter is None or (isinstance(rule.exporter, str) and rule.exporter)
        assert math.isfinite(rule.freeze_timeout) and 0 < rule.freeze_timeout <= MAX_FREEZE_TIMEOUT
        assert rule.on_change in ("fail", "warn")
        assert isinstance(rule.required, bool)
        if rule.keep is not None and rule.keep.within is not None:
            assert math.isfinite(rule.keep.within)


@settings(
    max_examples=800,
    derandomize=True,
    deadline=timedelta(seconds=machine_pace().seconds(2)),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(data=inputs)
@example(data=b'$: "\\U00110000')  # PyYAML raised chr()'s ValueError for this escape (a fuzz run found it)
def test_loader_raises_only_policy_errors(data: bytes, policy_path: Path, fuzz_plugins: Plugins) -> None:
    policy_path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(_hang_s())
    try:
        try:
            policy = load_policy(policy_path)
        except PolicyProblems as exc:
            _assert_one_line(exc.problems, policy_path)
            return
        except PolicyError as exc:
            _assert_one_line([exc], policy_path)
            return
        _assert_sane(policy)
        problems = check_backends(policy, fuzz_plugins)
        assert isinstance(problems, list)
        _assert_one_line(problems, policy_path)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_fuzz_reaches_valid_policies(policy_path: Path, fuzz_plugins: Plugins) -> None:
    """The generator is not all noise: some near-valid documents load and pass."""
    accepted = 0

    @settings(max_examples=100, derandomize=True, database=None, deadline=None)
    @given(data=near_valid())
    def run(data: bytes) -> None:
        nonlocal accepted
        policy_path.write_bytes(data)
        try:
            policy = load_policy(policy_path)
        except PolicyError:
            return
        if not check_backends(policy, fuzz_plugins):
            accepted += 1

    run()
    assert accepted > 0
