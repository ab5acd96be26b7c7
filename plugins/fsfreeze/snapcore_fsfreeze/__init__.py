"""snapcore's FIFREEZE backend."""
