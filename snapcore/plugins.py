"""The plugin manager: loading backends, reporting broken ones, calling hooks typed.

``pm.hook.*`` is ``Any``; the rest of snapcore calls hooks only through
:class:`Plugins`, whose methods have real types. Backend hooks go to one backend
only (a subset hook caller that leaves every other plugin out); observer hooks are
broadcast.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FunctionType, ModuleType
from typing import TYPE_CHECKING, Any, cast

import pluggy

from snapcore import hookspecs
from snapcore.errors import PluginError, SnapcoreError
from snapcore.log import get_logger
from snapcore.safety.faults import inject
from snapcore.types import (
    BackendInfo,
    Checkpoint,
    Export,
    Image,
    ImageEntry,
    Mount,
    Option,
    Outcome,
    Rescue,
    Restored,
    Role,
    Support,
    Target,
)

if TYPE_CHECKING:
    from snapcore.store.manifest import Manifest

log = get_logger(__name__)

ENTRY_POINT_GROUP = "snapcore"
#: Plugins of the core itself, registered exactly like third-party ones.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (("none", "snapcore.builtin.none"),)


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedBackend:
    """A backend that loaded, with where it came from."""

    info: BackendInfo
    distribution: str
    version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokenPlugin:
    """A plugin that failed to load or to describe itself."""

    name: str
    distribution: str
    error: str


def _allowlist() -> set[str] | None:
    value = os.environ.get("SNAPCORE_PLUGINS")
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, but it never touches a module attribute that is not a
    plain function while looking for hooks: a backend's :func:`snapcore.lazy_import`
    modules stay unloaded until a hook of that backend really runs."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> pluggy.HookimplOpts | None:
        if isinstance(plugin, ModuleType):
            value = plugin.__dict__.get(name)
            # type(), not isinstance(): no attribute of a lazy module is read. A plain
            # function carries its own marker: what pluggy's getattr_static-based
            # lookup would find, at a fraction of the cost (~0.5 ms of each start)
            if type(value) is not FunctionType:
                return None
            opts = getattr(value, self.project_name + "_impl", None)
            return cast("pluggy.HookimplOpts", opts) if isinstance(opts, dict) else None
        return super().parse_hookimpl_opts(plugin, name)


class Plugins:
    """Typed façade over a pluggy ``PluginManager`` for snapcore's hooks."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.backends: dict[str, LoadedBackend] = {}
        self.broken: list[BrokenPlugin] = []
        self._callers: dict[tuple[str, str], Any] = {}

    # -- loading -----------------------------------------------------------------

    def register(self, plugin: object, name: str, *, distribution: str = "", version: str = "") -> None:
        """Register ``plugin`` under ``name``; backends must call themselves ``name``."""
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:  # the name is taken
            raise PluginError(f"plugin {name!r} ({distribution or 'unknown'}): {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} ({distribution or 'unknown'}): {exc}") from exc
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r} ({distribution or 'unknown'}): {exc}") from exc
        self._callers.clear()
        info = self._describe(plugin, name, distribution)
        if info is not None:
            self.backends[name] = LoadedBackend(info=info, distribution=distribution, version=version)

    def _describe(self, plugin: object, name: str, distribution: str) -> BackendInfo | None:
        impl = getattr(plugin, "snapcore_backend_info", None)
        if impl is None:
            return None
        try:
            info = self._one(name, "snapcore_backend_info")()
        except Exception as exc:
            self.pm.unregister(plugin)
            raise PluginError(
                f"plugin {name!r} ({distribution or 'unknown'}): snapcore_backend_info raised {exc!r}"
            ) from exc
        if info is None:
            return None
        if not isinstance(info, BackendInfo) or info.name != name:
            self.pm.unregister(plugin)
            raise PluginError(
                f"plugin {name!r} ({distribution or 'unknown'}) describes itself as "
                f"{getattr(info, 'name', info)!r}: a backend's name must equal its entry-point name"
            )
        return info

    def _load_safely(self, name: str, load: Callable[[], object], distribution: str, version: str) -> None:
        try:
            plugin = load()
            self.register(plugin, name, distribution=distribution, version=version)
        except PluginError as exc:
            self.broken.append(BrokenPlugin(name=name, distribution=distribution, error=str(exc)))
        except Exception as exc:  # an import error in someone else's plugin
            self.broken.append(BrokenPlugin(name=name, distribution=distribution, error=f"{type(exc).__name__}: {exc}"))

    def load_default_plugins(self, disabled: Iterable[str] = ()) -> None:
        skip = set(disabled)
        for name, module in DEFAULT_PLUGINS:
            if name not in skip:
                self._load_safely(name, functools.partial(importlib.import_module, module), "snapcore", _version())

    def load_entry_points(self, disabled: Iterable[str] = ()) -> None:
        """Load every plugin of the ``snapcore`` entry-point group, keeping broken ones aside."""
        from snapcore.entrypoints import entry_points

        skip = set(disabled)
        allow = _allowlist()
        for ep in entry_points(ENTRY_POINT_GROUP):
            if ep.name in skip or (allow is not None and ep.name not in allow):
                continue
            if self.pm.has_plugin(ep.name):
                self.broken.append(
                    BrokenPlugin(name=ep.name, distribution=ep.dist_name, error=f"name {ep.name!r} is already taken")
                )
                continue
            self._load_safely(ep.name, functools.partial(_load_trusted, ep), ep.dist_name, ep.dist_version)

    # -- lookups -------------------------------------------------------------------

    def names(self, role: Role | None = None) -> list[str]:
        """Names of loaded backends, optionally only those playing ``role``."""
        return sorted(n for n, b in self.backends.items() if role is None or role in b.info.roles)

    def info(self, name: str) -> BackendInfo:
        try:
            return self.backends[name].info
        except KeyError:
            raise PluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        for broken in self.broken:
            if broken.name == name:
                return f"backend {name!r} is broken: {broken.error}"
        known = ", ".join(self.names()) or "none"
        return f"unknown backend {name!r} (installed: {known}; see 'snapcore backends')"

    def _one(self, name: str, hook: str) -> Any:
        key = (name, hook)
        caller = self._callers.get(key)
        if caller is None:
            plugin = self.pm.get_plugin(name)
            if plugin is None:
                raise PluginError(self.unknown_message(name))
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            caller = self.pm.subset_hook_caller(hook, remove_plugins=others)
            self._callers[key] = caller
        return caller

    def implements(self, name: str, hook: str) -> bool:
        plugin = self.pm.get_plugin(name)
        return plugin is not None and callable(getattr(plugin, hook, None))

    # -- backend hooks (one backend) ----------------------------------------------

    def probe(self, name: str, mount: Mount) -> Support | None:
        try:
            result: Support | None = self._one(name, "snapcore_probe")(mount=mount)
        except Exception as exc:
            return Support.no(f"probe raised {type(exc).__name__}: {exc}")
        return result

    def option_schema(self, name: str) -> Sequence[Option]:
        try:
            result: Sequence[Option] | None = self._one(name, "snapcore_option_schema")()
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"backend {name!r}: snapcore_option_schema raised {exc!r}") from exc
        return tuple(result or ())

    def prepare(self, name: str, target: Target, role: Role) -> None:
        inject("prepare", name)
        self._one(name, "snapcore_prepare")(target=target, role=role)

    def rescue(self, name: str, target: Target) -> Rescue | None:
        if not self.implements(name, "snapcore_rescue"):
            return None
        result: Rescue | None = self._one(name, "snapcore_rescue")(target=target)
        return result

    def freeze(self, name: str, target: Target) -> None:
        inject("freeze", name)
        self._one(name, "snapcore_freeze")(target=target)

    def snapshot(self, name: str, target: Target) -> Image:
        inject("snapshot", name)
        image: Image | None = self._one(name, "snapcore_snapshot")(target=target)
        if image is None:
            raise PluginError(f"backend {name!r} implements no snapcore_snapshot")
        return image

    def thaw(self, name: str, target: Target) -> None:
        inject("thaw", name)
        self._one(name, "snapcore_thaw")(target=target)

    def precopy(self, name: str, target: Target, dest: Path) -> list[dict[str, Any]]:
        """The exporter's pre-copy rounds ([]: it copies nothing before the freeze)."""
        if not self.implements(name, "snapcore_precopy"):
            return []
        inject("precopy", name)
        rounds = self._one(name, "snapcore_precopy")(target=target, dest=dest)
        return [dict(r) for r in rounds or ()]

    def export(self, name: str, target: Target, image: Image, dest: Path) -> Export:
        inject("export", name)
        export: Export | None = self._one(name, "snapcore_export")(target=target, image=image, dest=dest)
        if export is None:
            raise PluginError(f"backend {name!r} implements no snapcore_export")
        return export

    def finish(self, name: str, target: Target, image: Image | None, export: Export | None) -> list[str]:
        inject("finish", name)
        if not self.implements(name, "snapcore_finish"):
            return []
        warnings = self._one(name, "snapcore_finish")(target=target, image=image, export=export)
        return [str(w) for w in warnings or ()]

    def discard(self, name: str, target: Target, image: Image | None, export: Export | None) -> None:
        inject("discard", name)
        self._one(name, "snapcore_discard")(target=target, image=image, export=export)

    def export_put(self, name: str, target: Target, export: Export, parts: Mapping[str, Path]) -> dict[str, Any]:
        """Copy ``parts`` (name → directory) into the export: the exporter, or the
        core when the export directory is local and the exporter does not."""
        inject("export_put", name)
        if self.implements(name, "snapcore_export_put"):
            done = self._one(name, "snapcore_export_put")(target=target, export=export, parts=dict(parts))
            if done is not None:
                return dict(done)
        local = _local_export_dir(export)
        if local is None:
            raise PluginError(f"backend {name!r} cannot copy {', '.join(parts)} into its export {export.path}")
        from snapcore.store.export_files import put_local

        return put_local(local, target.checkpoint_id, parts)

    def export_get(self, name: str, target: Target, export: Export, file_name: str, limit: int) -> bytes | None:
        """The file ``file_name`` of the export directory (None: not there yet)."""
        local = _local_export_dir(export)
        if self.implements(name, "snapcore_export_get"):
            data = self._one(name, "snapcore_export_get")(target=target, export=export, name=file_name, limit=limit)
            if data is not None:
                return bytes(data)[:limit]
            if local is None:
                return None  # not there (yet)
        if local is None:
            raise PluginError(f"backend {name!r} cannot read {file_name} from its export {export.path}")
        from snapcore.store.export_files import get_local

        return get_local(local, target.checkpoint_id, file_name, limit)

    def discard_partial(self, name: str, target: Target, dest: Path) -> list[str]:
        if not self.implements(name, "snapcore_discard_partial"):
            return []
        done = self._one(name, "snapcore_discard_partial")(target=target, dest=dest)
        return [str(line) for line in done or ()]

    def restore(
        self, name: str, target: Target, image: Image | None, export: Export | None, dest: Path | None, in_place: bool
    ) -> Restored:
        if not self.implements(name, "snapcore_restore"):
            raise PluginError(f"backend {name!r} cannot restore")
        result = self._one(name, "snapcore_restore")(
            target=target, image=image, export=export, dest=dest, in_place=in_place
        )
        if isinstance(result, Restored):
            return result
        return Restored(message=str(result))

    def verify(self, name: str, target: Target, image: Image | None, export: Export | None) -> list[str]:
        if not self.implements(name, "snapcore_verify"):
            return []
        try:
            problems = self._one(name, "snapcore_verify")(target=target, image=image, export=export)
        except Exception as exc:
            return [f"{name}: verify raised {type(exc).__name__}: {exc}"]
        return list(problems or ())

    def list_images(self, name: str, mount: Mount) -> list[ImageEntry]:
        if not self.implements(name, "snapcore_list_images"):
            return []
        return list(self._one(name, "snapcore_list_images")(mount=mount) or ())

    # -- observer hooks (broadcast) ------------------------------------------------

    def _broadcast(self, hook: str, **kwargs: Any) -> list[tuple[str, Exception]]:
        """Call ``hook`` on every plugin that implements it, each on its own (pluggy's
        order): one that raises does not keep the others from theirs, as one broadcast
        call would. Returns ``(plugin, error)`` for each that raised."""
        errors: list[tuple[str, Exception]] = []
        caller = getattr(self.pm.hook, hook)
        impls = caller.get_hookimpls()
        if len(impls) <= 1:  # nothing to keep apart: one call, as pluggy makes it
            try:
                caller(**kwargs)
            except Exception as exc:
                errors.append((impls[0].plugin_name if impls else "?", exc))
            return errors
        for impl in reversed(impls):
            try:
                self._one(impl.plugin_name, hook)(**kwargs)
            except Exception as exc:
                errors.append((impl.plugin_name, exc))
        return errors

    def before_freeze(self, checkpoint: Checkpoint) -> None:
        """Every plugin's ``before_freeze``; a failure of any fails the checkpoint
        (:class:`PluginError` naming each), after all were called."""
        errors = self._broadcast("snapcore_before_freeze", checkpoint=checkpoint)
        if errors:
            raise PluginError("before_freeze failed: " + "; ".join(f"{name}: {_said(e)}" for name, e in errors))

    def after_thaw(self, checkpoint: Checkpoint) -> list[str]:
        """Every plugin's ``after_thaw``; returns a warning per plugin that raised."""
        errors = self._broadcast("snapcore_after_thaw", checkpoint=checkpoint)
        return [f"after_thaw of {name} raised {_said(e)}" for name, e in errors]

    def checkpoint_end(self, checkpoint: Checkpoint, outcome: Outcome, manifest: Manifest) -> list[str]:
        """Every plugin's ``checkpoint_end``; returns a warning per plugin that raised."""
        errors = self._broadcast("snapcore_checkpoint_end", checkpoint=checkpoint, outcome=outcome, manifest=manifest)
        return [f"checkpoint_end of {name} raised {_said(e)}" for name, e in errors]


def _said(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SnapcoreError) else f"{type(exc).__name__}: {exc}"


def _load_trusted(ep: Any) -> object:
    """Import an entry point's module, refusing code others could have planted: as
    root, a plugin whose module, package or directory is writable by others is broken.
    Each package on the way is checked before it runs (``find_spec`` imports only the
    parents, checked already), so refused code never executes; an entry point that
    names an object (``module:attr``) is judged by its module."""
    if os.geteuid() == 0:
        parts = str(ep.module).split(".")
        for i in range(1, len(parts) + 1):
            spec = importlib.util.find_spec(".".join(parts[:i]))
            for place in _code_places(spec):
                mode = os.stat(place).st_mode
                if mode & 0o002 and not mode & 0o1000:
                    raise PluginError(f"refused: {place} is writable by others (mode {mode & 0o7777:o}); chmod o-w it")
    return ep.load()


def _code_places(spec: Any) -> list[str]:
    """The files and directories a module spec's code comes from (whoever can write
    one of them can replace the code)."""
    if spec is None:
        return []
    places: list[str] = []
    origin = spec.origin if spec.has_location else None
    if origin:
        places += [origin, os.path.dirname(origin)]
    for directory in spec.submodule_search_locations or ():  # a package: its directory and where it lies
        places += [str(directory), os.path.dirname(str(directory))]
    return list(dict.fromkeys(places))


def _version() -> str:
    from snapcore import __version__

    return __version__


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        log.debug("hook %s -> %s", hook_name, [i.plugin_name for i in hook_impls])

    def after(
        outcome: pluggy.Result[Any], hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]
    ) -> None:
        log.debug("hook %s done", hook_name)

    pm.add_hookcall_monitoring(before, after)


def make_plugins(*, entry_points: bool = True, defaults: bool = True, disabled: Iterable[str] = ()) -> Plugins:
    """Build a plugin manager with the core's plugins and every installed backend."""
    pm = PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if os.environ.get("SNAPCORE_TRACE_HOOKS") == "1":
        _trace(pm)
    plugins = Plugins(pm)
    disabled = tuple(disabled)
    if defaults:
        plugins.load_default_plugins(disabled)
    if entry_points:
        plugins.load_entry_points(disabled)
    return plugins


_default: tuple[tuple[object, ...], Plugins] | None = None
_default_lock = threading.Lock()


def _installation() -> tuple[object, ...]:
    """What :func:`make_plugins` finds depends on, read cheaply: the variables it
    reads, and each ``sys.path`` entry with its directory's modification time and
    link count (installing or removing a distribution adds or removes a
    ``*.dist-info`` directory there; the count tells even within one clock tick)."""
    entries: list[tuple[str, tuple[int, int] | None]] = []
    for entry in sys.path:
        try:
            st = os.stat(entry or ".")
            entries.append((entry, (st.st_mtime_ns, st.st_nlink)))
        except OSError:
            entries.append((entry, None))
    return os.environ.get("SNAPCORE_PLUGINS"), os.environ.get("SNAPCORE_TRACE_HOOKS"), tuple(entries)


def default_plugins() -> Plugins:
    """The plugins :func:`snapcore.checkpoint`, ``hold`` and ``plan`` use when given
    none: built once per process, like pytest's plugin manager, and built anew when
    what :func:`make_plugins` would find changed (``SNAPCORE_PLUGINS``, ``sys.path``,
    a distribution installed or removed). Building them costs ~1.5 ms a call."""
    global _default
    state = _installation()
    with _default_lock:
        if _default is None or _default[0] != state:
            _default = (state, make_plugins())
        return _default[1]


def _local_export_dir(export: Export) -> Path | None:
    """The export's directory when it is a local one (not a URL, not remote)."""
    path = str(export.path or "")
    return Path(path) if os.path.isabs(path) and os.path.isdir(path) else None
