"""The policy's JSON Schema (``snapcore policy schema``, issue 20 B4) against the loader:
every bad policy of ``tests/policies/bad/`` that a schema can express is rejected by
the schema too, and good policies pass both. The schema comes from the same key
lists, patterns and bounds as the loader, and from the installed backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from snapcore.errors import PolicyError
from snapcore.plugins import Plugins
from snapcore.policy import check_backends, load_policy
from snapcore.policy.document import load_yaml
from snapcore.policy.schema import policy_schema
from snapcore.testing import plugins_named

jsonschema = pytest.importorskip("jsonschema")

BAD = Path(__file__).parent / "policies" / "bad"

#: Bad policies whose fault no JSON Schema can state, and why. Those the YAML reader
#: itself refuses (aliases, duplicate keys, bombs, not UTF-8...) never reach one.
NOT_EXPRESSIBLE = {
    "freeze-timeout-nan.yaml": "NaN: no JSON number, and a schema's bounds do not compare it",
    "freeze-timeout-zero.yaml": "a duration string's value ('0s'): a schema matches its form",
    "freeze-timeout-over-an-hour.yaml": "a duration string's value ('2h'): a schema matches its form",
    "version-float.yaml": "JSON does not tell 1.0 from 1",
    "mount-dot-segments.yaml": "two keys naming one mount point: a relation between keys",
    "mount-double-slash.yaml": "two keys naming one mount point: a relation between keys",
    "mount-leading-double-slash.yaml": "two keys naming one mount point: a relation between keys",
    "mount-trailing-slash.yaml": "two keys naming one mount point: a relation between keys",
    "options-for-unused-backend.yaml": "options of a backend the rule does not use: a relation between keys",
}


def _plain(value: object) -> Any:
    """The loader's document (YAML nodes that remember their lines) as plain JSON data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@pytest.fixture(scope="module")
def corpus_plugins() -> Plugins:
    """The backends the corpus is written for (tests/test_policy_corpus.py's)."""
    return plugins_named("fsfreeze")


@pytest.fixture(scope="module")
def validator(corpus_plugins: Plugins) -> Any:
    schema = policy_schema(corpus_plugins)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _documents() -> list[Path]:
    """The corpus's files that are YAML the loader reads (those it refuses as YAML,
    aliases, duplicate keys, bombs, not UTF-8, never reach a schema)."""
    found = []
    for path in sorted(BAD.glob("*.yaml")):
        try:
            load_yaml(path)
        except PolicyError:
            continue
        found.append(path)
    return found


DOCUMENTS = _documents()


def test_the_list_of_what_no_schema_can_say_names_corpus_files() -> None:
    assert set(NOT_EXPRESSIBLE) <= {p.name for p in DOCUMENTS}
    assert len(DOCUMENTS) > 2 * len(NOT_EXPRESSIBLE)  # most of the corpus is checked


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_a_bad_policy_the_schema_can_express_is_rejected_by_it(path: Path, validator: Any) -> None:
    doc, _ = load_yaml(path)
    errors = list(validator.iter_errors(_plain(doc)))
    if path.name in NOT_EXPRESSIBLE:
        assert not errors, f"the schema now rejects it: drop it from NOT_EXPRESSIBLE ({errors[0].message})"
    else:
        assert errors, f"the loader refuses {path.name}; the schema passes it"


GOOD = [
    "version: 1\nmounts: {}\n",
    "version: 1\nmounts:\n  /srv/db: {imager: fsfreeze}\n  '*': {imager: none, required: false}\n",
    "version: 1\nstate_dir: /var/lib/x\nghost_limit: 64M\ndigest_limit: all\nuncovered: fail\n"
    "defaults: {freeze_timeout: 500ms, on_change: warn, keep: {last: 3, within: 7d}}\n"
    "mounts:\n  /srv/a:\n    imager: [fsfreeze, none]\n    exporter: none\n    freeze_timeout: 30\n"
    "    options: {fsfreeze: null}\n  /srv/b:\n    imager: auto\n    keep: {within: 1w}\n",
]


@pytest.mark.parametrize("text", GOOD)
def test_a_good_policy_passes_the_loader_and_the_schema(
    text: str, validator: Any, corpus_plugins: Plugins, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    assert check_backends(load_policy(path), corpus_plugins) == []
    doc, _ = load_yaml(path)
    assert list(validator.iter_errors(_plain(doc))) == []


def test_policy_schema_prints_every_installed_backend_s_options() -> None:
    """With every plugin: the command's output is a valid schema that knows, e.g., the
    tar exporter's options, and checks them."""
    env = {k: v for k, v in os.environ.items() if k != "SNAPCORE_PLUGINS"}
    argv = [sys.executable, "-m", "snapcore", "policy", "schema"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    options = schema["properties"]["mounts"]["additionalProperties"]["properties"]["options"]["properties"]
    assert "dest" in options["tar"]["properties"]
    v = jsonschema.Draft202012Validator(schema)
    ok = {
        "version": 1,
        "mounts": {"/srv": {"imager": "fsfreeze", "exporter": "tar", "options": {"tar": {"dest": "/b"}}}},
    }
    assert list(v.iter_errors(ok)) == []
    bad = {"version": 1, "mounts": {"/srv": {"imager": "fsfreeze", "options": {"tar": {"dest": "relative"}}}}}
    assert list(v.iter_errors(bad))
