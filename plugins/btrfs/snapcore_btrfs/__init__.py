"""snapcore backends for btrfs: read-only subvolume snapshots and send/receive exports.

The ``btrfs`` imager's hooks are in :mod:`.hooks`, its work in :mod:`.subvol`
(filesystem facts, probe, deleting subvolumes), :mod:`.markers` (what makes a
snapshot snapcore's), :mod:`.snapshot` (prepare and snapshot), :mod:`.images`
(delete, list, verify), :mod:`.restore` (``--to DIR``) and :mod:`.rollback`
(``--in-place``). The ``btrfs-send`` exporter is :mod:`.send_hooks` and :mod:`.send`.
Only the hooks modules are loaded when snapcore starts; the rest when used.
"""

BTRFS = "btrfs"
BTRFS_SEND = "btrfs-send"
