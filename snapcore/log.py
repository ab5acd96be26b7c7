"""Loggers that load :mod:`logging` when they are first used.

A checkpoint with nothing to say never imports logging (~2.5 ms of the ``snapcore``
command's start). :func:`get_logger` stands in for ``logging.getLogger``; the
command's settings (:func:`configure`) take effect the moment logging is loaded:
by the first of these loggers that is used, or at once when something else has
loaded it already (:func:`apply_if_loaded`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import logging

#: (verbose, quiet) given by the command line, not applied yet.
_settings: tuple[int, int] | None = None


def configure(verbose: int, quiet: int) -> None:
    """The command line's verbosity: ``snapcore: LEVEL: message`` on stderr."""
    global _settings
    _settings = (verbose, quiet)
    apply_if_loaded()


def apply_if_loaded() -> None:
    """Apply the settings now if :mod:`logging` is loaded (a plugin may log with it)."""
    if "logging" in sys.modules:
        _apply()


def _apply() -> None:
    global _settings
    if _settings is None:
        return
    verbose, quiet = _settings
    _settings = None
    import logging

    level = logging.WARNING - 10 * verbose + 10 * quiet
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("snapcore: %(levelname)s: %(message)s"))
    root = logging.getLogger("snapcore")
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, min(level, logging.CRITICAL)))
    root.propagate = False


class _Logger:
    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:  # debug, warning, isEnabledFor ...
        if self._logger is None:
            import logging

            _apply()
            self._logger = logging.getLogger(self._name)
        return getattr(self._logger, attr)


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, loaded on first use."""
    return cast("logging.Logger", _Logger(name))
