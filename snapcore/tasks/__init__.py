"""The checkpoint's tasks: resolving and freezing them (cgroups), the files they use
(inventory), what changes under them (the change watch), who holds a mount, and CRIU.

Internal: use what :mod:`snapcore` exports.
"""
