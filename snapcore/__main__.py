from snapcore.cli import entry

entry()
