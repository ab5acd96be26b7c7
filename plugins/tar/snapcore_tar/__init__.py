"""snapcore's exporters: ``tar`` (GNU tar archives) and ``rsync`` (trees with --link-dest)."""

TAR = "tar"
RSYNC = "rsync"
