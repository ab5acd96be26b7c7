#!/usr/bin/env python3
"""Write snapcore's shell completion and man page into a staging directory, laid out
as under a prefix: OUT/share/bash-completion/completions/snapcore,
OUT/share/zsh/site-functions/_snapcore, OUT/share/man/man8/snapcore.8 (run by
``make install-admin``)."""

from __future__ import annotations

import sys
from pathlib import Path

from snapcore.cli.docs import completion, manpage


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: admin-files.py OUT", file=sys.stderr)
        return 2
    out = Path(sys.argv[1])
    files = {
        out / "share/bash-completion/completions/snapcore": completion("bash"),
        out / "share/zsh/site-functions/_snapcore": completion("zsh"),
        out / "share/man/man8/snapcore.8": manpage(),
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
