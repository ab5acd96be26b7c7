"""Import a module on first use: what keeps ``snapcore``'s start short.

Every installed backend is imported when the CLI starts, but a command usually
needs one or two of them: a backend's hooks module imports its heavy parts through
:func:`lazy_import` and pays for them only when a hook really runs.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name``, loaded when one of its attributes is first read (the standard
    library's :class:`importlib.util.LazyLoader`). An import error shows then.

    Typical use in a backend's hooks module::

        if TYPE_CHECKING:
            from mybackend import backend
        else:
            backend = lazy_import("mybackend.backend")
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
