"""What keeps a filesystem from staying frozen and a checkpoint from staying half-made: the
journal (intents before acts, for ``recover``), the deadline watchdog (a thread), the
guard (a process that outlives a dead controller), cancellation, and test-only fault
injection.

Internal: use what :mod:`snapcore` exports.
"""
