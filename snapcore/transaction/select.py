"""Step 1 of the sequence: which mounts a checkpoint covers (the paths named, the
policy's mounts, or what the tasks use) and which backends image and export each."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snapcore.errors import PolicyProblems, SnapcoreError, UnsupportedMount, UsageError
from snapcore.host.mounts import MountTable, is_pseudo, mount_id_of, resolve_paths
from snapcore.plugins import Plugins
from snapcore.policy import Policy, Rule, check_backends
from snapcore.types import Mount, Role, Support

if TYPE_CHECKING:
    from snapcore.tasks.inventory import Inventory
    from snapcore.tasks.resolve import TaskSet
    from snapcore.transaction.targets import TaskSpec


@dataclass(slots=True, kw_only=True)
class Selection:
    """The plan for one mount: chosen backends and every backend's answer."""

    mount: Mount
    rule: Rule
    imager: str | None = None
    exporter: str | None = None
    answers: dict[str, Support | None] = field(default_factory=dict)
    error: str | None = None

    def why(self) -> str:
        if self.imager is None:
            return self.error or "no usable imager"
        answer = self.answers.get(self.imager)
        how = "chosen by the policy" if not self.rule.auto else "best probe"
        return f"{how}: {answer.reason}" if answer else how


def select(plugins: Plugins, mount: Mount, rule: Rule) -> Selection:
    """Pick the imager for ``mount``: the policy's first usable choice, else the best probe."""
    sel = Selection(mount=mount, rule=rule, exporter=rule.exporter)
    imagers = plugins.names(Role.IMAGER)
    for name in imagers:
        sel.answers[name] = plugins.probe(name, mount)
    if rule.auto:
        # a score of 0 means "usable when named, never chosen by auto" (``none``)
        usable = [(a.score, n) for n, a in sel.answers.items() if a is not None and a.ok and a.score > 0]
        if usable:
            sel.imager = max(usable, key=lambda s: (s[0], [-ord(c) for c in s[1]]))[1]
    else:
        for name in rule.imager:
            if name not in plugins.backends:
                continue
            answer = sel.answers.get(name)
            if answer is None or answer.ok:
                sel.imager = name
                break
    if sel.imager is None:
        considered = imagers if rule.auto else list(rule.imager)
        reasons = []
        for name in considered:
            answer = sel.answers.get(name)
            if name not in plugins.backends:
                reasons.append(f"{name}: not installed")
            elif answer is None:
                reasons.append(f"{name}: no answer")
            else:
                reasons.append(f"{name}: {answer.reason}")
        sel.error = f"no usable imager for {mount.mount_point} ({mount.fstype}): " + "; ".join(reasons)
    return sel


def resolve_mounts(
    table: MountTable, policy: Policy, paths: Sequence[str | os.PathLike[str]]
) -> tuple[list[tuple[Mount, Rule]], list[str]]:
    """The mounts to checkpoint with their rules, and warnings for skipped ones."""
    warnings: list[str] = []
    result: list[tuple[Mount, Rule]] = []
    if paths:
        for mount in resolve_paths(table, paths):
            rule = policy.rule_for(mount.mount_point)
            if rule is None:
                raise UsageError(
                    f'{mount.mount_point} is not covered by the policy {policy.path} (add a rule for it, or a "*" rule)'
                )
            result.append((mount, rule))
        return result, warnings
    if not policy.rules:
        raise UsageError("nothing to checkpoint: give PATHs, or a --policy that names mounts")
    seen: set[int] = set()
    for key, rule in policy.rules.items():
        try:
            if not Path(key).exists():
                raise UsageError(f"{key}: no such file or directory")
            mount = table.find(key)
            if is_pseudo(mount):
                raise UnsupportedMount(f"{key} is a {mount.fstype} pseudo filesystem")
            if mount.mount_point != key:
                raise UsageError(f"{key} is not a mount point (it is inside the mount {mount.mount_point})")
        except SnapcoreError as exc:
            if rule.required:
                raise UsageError(f"policy {policy.path}, mount {key}: {exc}") from None
            warnings.append(f"{key} skipped (required: false): {exc}")
            continue
        if mount.mount_id not in seen:
            seen.add(mount.mount_id)
            result.append((mount, rule))
    return result, warnings


def plan(
    plugins: Plugins, policy: Policy, paths: Sequence[str | os.PathLike[str]] = (), table: MountTable | None = None
) -> tuple[list[Selection], list[str]]:
    """What a checkpoint would do; probes only, touches nothing."""
    problems = check_backends(policy, plugins)
    if problems:
        raise PolicyProblems(problems)
    table = table or MountTable.read()
    mounts, warnings = resolve_mounts(table, policy, paths)
    return [select(plugins, m, r) for m, r in mounts], warnings


@dataclass(slots=True)
class TaskMounts:
    """What the tasks of a checkpoint are and use: their mounts are its targets."""

    taskset: TaskSet
    inventory: Inventory
    mounts: list[tuple[Mount, Rule]]
    warnings: list[str]


def task_mounts(
    table: MountTable,
    policy: Policy,
    paths: Sequence[str | os.PathLike[str]],
    spec: TaskSpec,
    own: Sequence[Path],
) -> TaskMounts:
    """Targets from what the tasks use (DESIGN step 1: their open files, mappings and
    working directories, inventoried now), plus any ``paths`` named. The root
    filesystem and the mounts holding ``own`` (snapcore's state and run directories)
    are left out unless the policy names them."""
    from snapcore.tasks.inventory import take_inventory
    from snapcore.tasks.resolve import resolve_cgroup, resolve_pid

    taskset = resolve_pid(spec.pid) if spec.pid is not None else resolve_cgroup(spec.cgroup or "")
    inventory = take_inventory(taskset.pids, table=table)
    result, warnings = resolve_mounts(table, policy, paths) if paths else ([], [])
    warnings.extend(inventory.warnings)
    seen = {m.mount_id for m, _ in result}
    ours: set[int] = set()
    for path in own:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        ours.add(mount_id_of(probe))
    for mount in inventory.mounts:
        if mount.mount_id in seen:
            continue
        named = mount.mount_point in policy.rules
        if not named and (mount.mount_point == "/" or mount.mount_id in ours):
            why = "the root filesystem" if mount.mount_point == "/" else "it holds snapcore's state"
            warnings.append(f"{mount.mount_point}: used by the tasks but not frozen ({why}); name it to include it")
            continue
        rule = policy.rule_for(mount.mount_point)
        if rule is None:
            message = f"{mount.mount_point}: used by the tasks but not covered by the policy {policy.path}"
            if policy.uncovered == "fail":
                raise UsageError(message + " (uncovered: fail)")
            warnings.append(message)
            continue
        seen.add(mount.mount_id)
        result.append((table.enrich(mount), rule))
    if not result:
        why = "; ".join(warnings) if warnings else "they hold no file on a real filesystem"
        raise UsageError(f"the tasks use no mount that can be checkpointed: {why}")
    return TaskMounts(taskset, inventory, result, warnings)


__all__: Any = ["Selection", "TaskMounts", "plan", "resolve_mounts", "select", "task_mounts"]
