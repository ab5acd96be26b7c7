"""snapcore backends for btrfs: read-only subvolume snapshots and send/receive exports."""

BTRFS = "btrfs"
BTRFS_SEND = "btrfs-send"
