"""Hook specifications: the contract between the snapcore core and its backends.

Two kinds of hook:

* **backend hooks** are called only on the backend selected for a target (the
  imager, or the exporter), never broadcast. The core calls them through
  :class:`snapcore.plugins.Plugins`, one plugin at a time.
* **observer hooks** (``before_freeze``, ``after_thaw``, ``checkpoint_end``) are
  broadcast to every registered plugin, backends and plain observers alike. Each
  plugin is called on its own: one that raises does not keep the others from their
  call (a failing ``before_freeze`` fails the checkpoint once all were called; a
  failing ``after_thaw`` or ``checkpoint_end`` is a warning naming the plugin).

A backend keeps what one hook learns for the next ones of the same checkpoint (a plan
made in ``prepare``, a descriptor ``freeze`` holds for ``thaw``) in
``target.state_of(NAME)``, never in module globals: the same :class:`Target` object
reaches every hook of one checkpoint, and ``checkpoint.targets`` holds them for the
observer hooks. (Added without changing any hook's signature: backends written before
it work as they are.)

A backend is one plugin registered under its backend name (the entry-point name in
the group ``snapcore``); that name is what a policy writes.

While any target is frozen, no hook may import modules, write files or log to a
file on a frozen mount: the write would block until the thaw, which would never come.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from snapcore.store.manifest import Manifest
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

PROJECT = "snapcore"
hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec(firstresult=True)
def snapcore_backend_info() -> BackendInfo | None:
    """Describe this backend: name, roles, and whether its image is the live tree.

    **When**: once, when the plugin manager loads plugins; also by ``snapcore
    backends``. A plugin that returns ``None`` (or has no such hook) is an
    observer, not a backend.

    **Returns**: a :class:`~snapcore.types.BackendInfo` whose ``name`` equals the
    name the plugin was registered under (its entry-point name).

    **May**: nothing but build the record. **Must not**: touch devices or run tools.

    **Raises**: the plugin is reported as broken by ``snapcore backends`` and is
    not used; the CLI does not crash.
    """


@hookspec(firstresult=True)
def snapcore_option_schema() -> Sequence[Option] | None:
    """Declare the options this backend accepts under ``options: {NAME: {...}}``.

    **When**: when a policy is loaded or checked, once per backend.

    **Returns**: the :class:`~snapcore.types.Option` records; the core validates
    every mount's options against them (unknown keys, types, choices, required
    keys) and reports errors naming the policy file, line, mount and key.
    ``None`` means the backend takes no options.

    **Must not**: look at the machine; the schema is static.

    **Raises**: treated as a broken plugin (a ``PluginError`` for the policy).
    """


@hookspec(firstresult=True)
def snapcore_probe(mount: Mount) -> Support | None:
    """Say whether this backend can image ``mount``, how well, and why (not).

    **When**: during selection, for every target and every imager backend (a
    broadcast, although the core asks each backend in turn to know who answered);
    by ``snapcore plan`` and ``snapcore backends``. Nothing is frozen.

    **Args**: ``mount``, enriched with the device behind it.

    **Returns**: :class:`~snapcore.types.Support` ``yes`` with a score (the best
    score wins ``imager: auto``) or ``no`` with a reason a person can act on.
    ``None`` means "not my business" (an exporter-only backend).

    **Must not**: change anything or take long: it must be cheap and side-effect
    free (``plan`` promises to touch nothing).

    **Raises**: counted as ``no`` with the exception as its reason.
    """


@hookspec(firstresult=True)
def snapcore_prepare(target: Target, role: Role) -> None:
    """Get ready to image (``role`` imager) or export (``role`` exporter) ``target``.

    **When**: once per target and role, before anything of the checkpoint is
    frozen. Called only on the backend selected for that role.

    **May**: check tools, space and permissions; create directories; ``syncfs``
    the filesystem so that the freeze that follows is short.

    **Must not**: freeze anything or leave anything behind that ``discard`` would
    not clean up.

    **Raises**: the checkpoint fails before any freeze (or the target is skipped
    with a warning when it is not ``required``).
    """


@hookspec(firstresult=True)
def snapcore_rescue(target: Target) -> Rescue | None:
    """Say how another process can thaw ``target`` if the controller dies.

    **When**: on the selected imager, once per target, after ``prepare`` and before
    anything is frozen. The answer goes to the guard process (which thaws on the
    controller's death or at the deadline) and to the journal (for ``snapcore
    recover`` after a crash).

    **Returns**: a :class:`~snapcore.types.Rescue` (FITHAW on the mount, or a
    command such as ``dmsetup resume``); ``None`` when ``freeze`` holds nothing
    that outlives the controller (a btrfs snapshot freezes nothing).

    **Must not**: freeze or change anything.

    **Raises**: the checkpoint fails before any freeze: a freeze nobody else could
    undo is not taken.
    """


@hookspec
def snapcore_before_freeze(checkpoint: Checkpoint) -> None:
    """Quiesce applications before the filesystems freeze (like a VSS writer).

    **When**: broadcast to every plugin, once per checkpoint, after ``prepare``
    and right before the first ``freeze``. Nothing is frozen yet.

    **May**: flush a database, pause a writer; keep it short.

    **Raises**: the checkpoint fails; nothing has been frozen, everything
    prepared is discarded.
    """


@hookspec(firstresult=True)
def snapcore_freeze(target: Target) -> None:
    """Stop writes to ``target`` from reaching its image.

    **When**: on the selected imager, inside the freeze window, once per target.
    Targets on independent devices are frozen in parallel threads, so this must be
    thread-safe across targets; a target is frozen only after every target whose
    backing device lives on it (a loop file, a nested mount).

    **May**: FIFREEZE the filesystem; do nothing when ``snapshot`` is atomic on its
    own (a btrfs snapshot, a device-mapper suspend).

    **Must not**: write to any filesystem of this checkpoint, import modules, or
    retry an ``EBUSY`` freeze: another tool froze it; raise
    :class:`~snapcore.errors.FrozenElsewhere`.

    **Raises**: the checkpoint fails; ``thaw`` is *not* called for this target
    (the freeze did not happen) but is called for every target already frozen.
    """


@hookspec(firstresult=True)
def snapcore_snapshot(target: Target) -> Image:
    """Make the point-in-time image of ``target`` and return its reference.

    **When**: on the selected imager, inside the freeze window, after every target
    of the checkpoint has been frozen; targets in parallel.

    **Returns**: an :class:`~snapcore.types.Image`, with an honest
    ``consistency`` and ``live=True`` when the image is the frozen live tree
    (then an exporter copies it before the thaw).

    **Must**: be fast: every writer of every target waits for it.

    **Raises**: the checkpoint fails; every frozen target is thawed and images
    already made are discarded.
    """


@hookspec(firstresult=True)
def snapcore_thaw(target: Target) -> None:
    """Let writes reach ``target`` again.

    **When**: on the selected imager, once for every target whose ``freeze``
    succeeded, in reverse order, even after failures, from a ``finally``; also from
    the deadline watchdog. The core makes sure it is called at most once per freeze.

    **Must not**: raise for a target that is already thawed by someone else.

    **Raises**: a :class:`~snapcore.errors.ThawError` is reported loudly and the
    remaining targets are still thawed.
    """


@hookspec
def snapcore_after_thaw(checkpoint: Checkpoint) -> None:
    """Resume what ``before_freeze`` paused.

    **When**: broadcast, once per checkpoint whose ``before_freeze`` ran, right
    after the last thaw, whatever happened in between.

    **Raises**: recorded as a warning in the manifest; the checkpoint goes on.
    """


@hookspec(firstresult=True)
def snapcore_precopy(target: Target, dest: Path) -> Sequence[Mapping[str, Any]] | None:
    """Copy the live mount of ``target`` to ``dest`` before anything is frozen, so
    that ``export`` then moves only what changed since (live migration's pre-copy).

    **When**: on the selected exporter, once per target whose options for it hold a
    true ``precopy`` (the policy asks for it), after every ``prepare`` and before
    any freeze, while the checkpoint's tasks still run.

    **Returns**: one record per round of copying (e.g. ``round``, ``bytes``,
    ``files``, ``ms``), for the manifest's ``precopy``; ``None`` or empty: nothing
    was copied.

    **Must**: write only where its ``export`` to ``dest`` will write, so that the
    export completes it; what it wrote must be what ``discard_partial(target,
    dest)`` removes (the core calls it when the checkpoint fails before the export,
    and ``recover`` when the controller dies).

    **Raises**: the checkpoint fails before any freeze; what was copied is removed.
    """


@hookspec(firstresult=True)
def snapcore_export(target: Target, image: Image, dest: Path) -> Export:
    """Copy ``image`` of ``target`` to ``dest`` (the exporter's ``dest`` option).

    **When**: on the selected exporter, once per target. Outside the freeze window
    when the image is a real snapshot; inside it, while the filesystem is frozen,
    when ``image.live`` is true (so it must be as fast as the raw tool).

    **Returns**: an :class:`~snapcore.types.Export` whose ``ref`` lets ``restore``
    and ``verify`` find the copy again.

    **Must**: leave nothing that looks complete when it fails (write under a
    temporary name and rename last).

    **Raises**: the checkpoint fails; images and exports already made are discarded.
    """


@hookspec(firstresult=True)
def snapcore_finish(target: Target, image: Image | None, export: Export | None) -> Sequence[str] | None:
    """Complete an image (imager) or an export (exporter; ``export`` is set) before
    the manifest calls it good: checksums, ``syncfs``, a health check.

    **When**: once per target of a checkpoint that is about to succeed, after every
    export, after the change check and the tasks' thaw, before the manifest is
    written. Nothing is frozen. Called on the imager with ``export=None``, then on
    the exporter with the export.

    **Returns**: warnings for the manifest (e.g. a COW nearly full), or ``None``.

    **Must not**: leave the export looking complete if it raises.

    **Raises**: the checkpoint fails; every image and export it made is discarded.
    """


@hookspec(firstresult=True)
def snapcore_export_put(target: Target, export: Export, parts: Mapping[str, Path]) -> Mapping[str, Any] | None:
    """Copy each directory of ``parts`` into this checkpoint's export directory under
    its name (``criu``: a ``criu dump``'s images; ``ghosts``: the copies of the tasks'
    deleted files), so that they travel with the files.

    **When**: on the selected exporter, after ``export`` and the payload, before
    ``finish``; once per export directory (targets sharing one get it once). Not
    implemented (or ``None``): the core copies into ``export.path`` itself when that is
    a local directory, else the checkpoint fails (``--send-images`` cannot be honoured).

    **Returns**: what was copied (e.g. ``files``, ``bytes``, ``ms``), for the manifest.

    **Must**: leave each part complete or absent (a copy under a temporary name,
    renamed; for a remote destination, the manifest copy written after it is what
    says complete); the exporter's ``discard`` of this export removes them too (the
    core lists the names put in ``export.details["put"]``).

    **Raises**: the checkpoint fails; its exports are discarded.
    """


@hookspec(firstresult=True)
def snapcore_export_get(target: Target, export: Export, name: str, limit: int) -> bytes | None:
    """Read the small file ``name`` from this checkpoint's export directory, where
    another host wrote it (the destination's answer in a hand-off).

    **When**: on the selected exporter, polled while the checkpoint's tasks are held
    for a hand-off (``checkpoint --hand-off``). Not implemented: the core reads
    ``export.path / name`` itself when that is a local directory.

    **Returns**: at most ``limit`` bytes, or ``None`` when the file is not there (yet).
    What it returns is untrusted: the core parses it as such.

    **Raises**: :class:`~snapcore.errors.BackendError` when the destination cannot be
    reached; the core asks again until its deadline.
    """


@hookspec(firstresult=True)
def snapcore_discard(target: Target, image: Image | None, export: Export | None) -> None:
    """Delete an image (imager) or an export (exporter; ``export`` is set).

    **When**: on failure, to undo what this checkpoint made; on ``prune`` and
    ``delete``. Called on the imager with ``export=None``, on the exporter with the
    export (first).

    **Must**: be idempotent (a missing image is not an error) and delete only what
    snapcore made.

    **Raises**: recorded as a warning on failure (the rest is still discarded); on
    ``prune`` and ``delete``, an error keeps the image in its manifest.
    :class:`~snapcore.errors.StillNeeded` says later images or exports build on this
    one (an incremental chain's base): ``prune`` keeps it without an error.
    """


@hookspec(firstresult=True)
def snapcore_discard_partial(target: Target, dest: Path) -> Sequence[str] | None:
    """Delete what an export of ``target`` to ``dest`` half wrote and never finished.

    **When**: by ``snapcore recover`` (also run at the start of every checkpoint),
    on the exporter of a target of a checkpoint whose controller died during
    ``export`` (its journal holds the intent and no result). ``dest`` is the path
    ``export`` was given. The exporter's commands were started with
    :func:`~snapcore.safety.cancel.tied_to_controller`, so they died with it.

    **Returns**: what was removed, one line each, for the report; ``None`` or empty:
    nothing was found.

    **Must**: remove only files this checkpoint's export writes (named after
    ``target.checkpoint_id`` and the mount), never a finished export of another
    checkpoint; be idempotent.

    **Raises**: reported by ``recover``; the rest is still recovered.

    Added with the journal's export records; a backend without it leaves partial
    files for the admin.
    """


@hookspec(firstresult=True)
def snapcore_restore(
    target: Target, image: Image | None, export: Export | None, dest: Path | None, in_place: bool
) -> str | Restored:
    """Bring an image (or export) back, to ``dest`` or in place.

    **When**: ``snapcore restore``; on the exporter when the checkpoint has an
    export (``export`` set), else on the imager.

    **Returns**: a line saying where the data now is; or a :class:`Restored` with
    that line and the replaced state, when the backend kept it as an image (snapcore
    records it as a checkpoint of its own).

    **Must**: refuse (raise) rather than overwrite data that is not backed up. In
    place, the mount must show the restored state when this returns: a command
    given after ``--`` (``criu restore``) starts on it next. When that cannot be
    done now (the mount is in use), raise :class:`MountBusy` (``mount_holders``
    says who uses it) before changing anything, never defer it to a later mount.

    **Raises**: the restore fails with that message, exit code 1.
    """


@hookspec(firstresult=True)
def snapcore_verify(target: Target, image: Image | None, export: Export | None) -> Sequence[str]:
    """Check that an image (or export) is still there and intact.

    **When**: ``snapcore verify``, on the imager with ``export=None`` and on the
    exporter with the export.

    **Returns**: the problems found, one line each; empty when all is well.

    **Raises**: counted as one problem.
    """


@hookspec(firstresult=True)
def snapcore_list_images(mount: Mount) -> Sequence[ImageEntry]:
    """List the images of ``mount`` that this backend made (for ``list``, ``prune``).

    **When**: on an imager, from ``list`` and ``prune``.

    **Must**: list only what snapcore made; nothing else may ever be pruned.
    """


@hookspec
def snapcore_checkpoint_end(checkpoint: Checkpoint, outcome: Outcome, manifest: Manifest) -> None:
    """Report a finished checkpoint (metrics, notifications).

    **When**: broadcast, once per checkpoint, after the manifest is written,
    success or failure. Nothing is frozen.

    **Raises**: logged; the outcome does not change.
    """
