"""Policy options for the exporters: defaults merged under each mount's own."""

from __future__ import annotations

from pathlib import Path

import snapcore


def _policy(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    path.chmod(0o644)
    return path


DEFAULT_OPTIONS = """\
version: 1
defaults:
  options:
    fsfreeze: {sync: false}
    tar: {dest: /backup/all, compress: zstd}
mounts:
  /srv/a:
    imager: none
    exporter: tar
    options:
      tar: {dest: /backup/a}
  /srv/b:
    imager: fsfreeze
  /srv/c:
    imager: none
    exporter: rsync
    options:
      rsync: {dest: /backup/c}
"""


def test_options_merge_over_the_defaults_key_by_key(tmp_path: Path) -> None:
    path = _policy(tmp_path, DEFAULT_OPTIONS)
    # defaults for backends a mount does not use are no mistake of that mount
    assert snapcore.check_policy(path) == []
    policy = snapcore.load_policy(path)
    tar = snapcore.backend_options(policy, "/srv/a", "tar")
    assert (tar["dest"], tar["compress"]) == ("/backup/a", "zstd")
    assert snapcore.backend_options(policy, "/srv/b", "fsfreeze")["sync"] is False
    assert snapcore.backend_options(path, "/srv/c", "rsync")["dest"] == "/backup/c"
    a, b, c = (policy.rules[m] for m in ("/srv/a", "/srv/b", "/srv/c"))
    assert a.own_options == {"tar"} and b.own_options == frozenset() and c.own_options == {"rsync"}


def test_own_options_for_a_backend_the_mount_does_not_use_are_still_an_error(tmp_path: Path) -> None:
    text = DEFAULT_OPTIONS.replace("rsync: {dest: /backup/c}", "rsync: {dest: /backup/c}\n      tar: {}")
    problems = snapcore.check_policy(_policy(tmp_path, text))
    assert len(problems) == 1
    assert "mount /srv/c" in str(problems[0]) and "which this mount does not use" in str(problems[0])
