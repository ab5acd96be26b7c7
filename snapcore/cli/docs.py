"""Shell completion (bash, zsh) and the man page, generated from the command line's
own parser, so that they never drift from it: ``shtab`` for completion (it reads an
argparse parser as it is, subcommands and choices included, and writes both shells'
scripts), ``argparse-manpage`` for the man page (the same parser, as troff). Both are
only needed to generate them (``make install-admin``): ``pip install 'snapcore[admin]'``.
"""

from __future__ import annotations

import argparse

from snapcore import __version__
from snapcore.errors import UsageError

SHELLS = ("bash", "zsh")

DESCRIPTION = """snapcore makes the filesystems under a process checkpoint consistent with it:
for every mount point involved it freezes writes, takes a point-in-time image, copies it
elsewhere if asked, and thaws, through backends chosen per mount (btrfs snapshots,
device-mapper/LVM snapshots, FIFREEZE, tar and rsync exports). The policy is a YAML file
(--policy); manifests live in STATE/checkpoints/ID. Exit codes: 0 success, 1 the
checkpoint (or restore, verify) failed and a manifest says why, 2 bad usage or bad policy."""


FILES = r""".TP
\fI/etc/snapcore/NAME.yaml\fR
a policy (\fB\-\-policy\fR; \fBsnapcore-checkpoint@NAME.timer\fR checkpoints with it)
.TP
\fI/var/lib/snapcore/checkpoints/ID/manifest.json\fR
a checkpoint's manifest (\fB\-\-state-dir\fR, env SNAPCORE_STATE_DIR);
\fIcluster.json\fR beside it, a cluster checkpoint's
.TP
\fI/run/snapcore\fR
the journal and locks (\fB\-\-run-dir\fR, env SNAPCORE_RUN_DIR)"""

SEE_ALSO = r"""\fBcriu\fR(8), \fBsnapper\fR(8), \fBlvcreate\fR(8), \fBfsfreeze\fR(8), \fBbtrfs-subvolume\fR(8),
\fBetcd\fR(1); the README for the policy format, the hook protocol and the recipes"""


def _parser() -> argparse.ArgumentParser:
    from snapcore.cli.parser import build_parser

    parser = build_parser()
    parser.description = DESCRIPTION
    return parser


def completion(shell: str) -> str:
    """The ``shell`` completion script for ``snapcore``."""
    if shell not in SHELLS:
        raise UsageError(f"no completion for {shell!r}: {', '.join(SHELLS)}")
    try:
        import shtab
    except ImportError:
        raise UsageError("shtab is not installed: pip install 'snapcore[admin]'") from None
    return str(shtab.complete(_parser(), shell=shell))


def manpage() -> str:
    """``snapcore(8)``, as troff."""
    try:
        from argparse_manpage.manpage import Manpage
    except ImportError:
        raise UsageError("argparse-manpage is not installed: pip install 'snapcore[admin]'") from None
    page = Manpage(_parser())
    page.section = 8
    page.source = f"snapcore {__version__}"
    page.manual = "snapcore manual"
    page.description = "make the filesystems under a process checkpoint consistent with it"
    page.add_section("files", "=", FILES)
    page.add_section("see also", "=", SEE_ALSO)
    # a text line that starts with a quote is a troff request: escape it
    return "\n".join("\\&" + line if line.startswith("'") else line for line in str(page).split("\n"))
