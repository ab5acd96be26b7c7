"""snapcore backend for device-mapper snapshots (LVM thick and thin, raw dm)."""

NAME = "dm"
