"""This machine: its mount table and devices, the per-mount locks, filesystem helpers, and
the tools backends run.

Internal: use what :mod:`snapcore` exports.
"""
