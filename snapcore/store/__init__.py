"""Checkpoints at rest: manifests, the targets rebuilt from them, retention (prune,
delete), restore and verify, and the checks on what comes from elsewhere (confine,
defuse).

Internal: use what :mod:`snapcore` exports.
"""
