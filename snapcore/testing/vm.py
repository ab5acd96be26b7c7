"""A throw-away virtual machine for tests that need a kernel this host lacks.

This machine's kernel has no device-mapper, so dm and LVM tests run inside qemu
with Debian's own kernel (``linux-image-amd64``), booted by virtme-ng (``vng``)
under software emulation: the host's ``/`` is the guest's root, read-only over 9p,
so the guest runs this checkout and its virtual environment as they are. The
measured recipe and its flags are in ``shared/notes/dm-vm.md``.

A boot costs ~7-10 s, so a caller batches: one :meth:`TestVM.run` (a shell command)
or :meth:`TestVM.pytest` (a pytest selection) per group of scenarios, never one
boot per small test. Every boot is killed as a whole process group (vng → sh →
virtme-run → qemu) on a timeout or an interrupt, so no qemu outlives it. Boots are
serialised by a lock (across processes too: a ``flock`` in the temporary
directory): two VMs at once run three times slower.

Inside the guest the command runs as root with ``DM_DISABLE_UDEV=1`` (no udev
daemon: dmsetup and LVM make their own ``/dev/mapper`` nodes), the venv's ``bin/``
first on ``PATH``, ``SNAPCORE_IN_VM=1``, and ``SNAPCORE_VM_OUT`` naming the one
directory it can write back to the host.

Time: a guest pytest run streams its events (:mod:`snapcore.testing.vmreport`) to the host
while it goes, and the host holds it to a :class:`Budget` derived from what this
very run measured — the boot time, and figures the guest announces (one ``lvcreate
-s``; :mod:`snapcore.testing.vmprogress`) — never to a constant tuned on one machine. A run that overstays is killed,
and its report names the test that was running, what passed and failed before it,
and the last lines the guest printed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from snapcore.testing.vmprogress import Budget, Progress

__all__ = ["Budget", "GuestTests", "Progress", "TestVM", "VMResult", "VMUnavailable"]

#: Debian packages the VM needs on the host (virtme-ng comes from PyPI).
HOST_PACKAGES = ("qemu-system-x86", "linux-image-amd64", "busybox-static")

#: Modules the guest need not load: they halve its udev phase (dm-vm.md).
MODULE_BLACKLIST = (
    "kvm,kvm_intel,kvm_amd,ahci,libata,sr_mod,cdrom,sg,iTCO_wdt,iTCO_vendor_support,"
    "i2c_i801,i2c_smbus,psmouse,pcspkr,serio_raw,evdev,i6300esb,button"
)

#: Software emulation: this host's /dev/kvm is a nested paravirtual KVM that cannot
#: run a stock kernel. ``tb-size=256`` halves qemu's memory; ``qemu64`` keeps udev
#: from loading needless modules (``max,-svm`` panics the guest).
QEMU_OPTS = "-cpu qemu64 -nodefaults -accel tcg,tb-size=256"

#: Modules loaded in the guest before the command runs.
GUEST_MODULES = ("loop", "dm_mod", "dm_snapshot", "dm_thin_pool", "xfs", "btrfs")

#: The guest's event stream (snapcore.testing.vmreport.EVENTS; not imported: it needs pytest).
_EVENTS = "events.jsonl"

_BOOT_LOCK = threading.Lock()
_KERNEL_RE = re.compile(r"vmlinuz-(\d+)\.(\d+)\.(\d+)-(\d+)-amd64$")


class VMUnavailable(RuntimeError):
    """The VM cannot run on this machine; the message says what to install."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VMResult:
    """What one boot gave back."""

    returncode: int
    #: The guest command's own stdout and stderr (written to the shared directory).
    stdout: str
    stderr: str
    #: vng's console output (kernel and virtme messages), for diagnosing a boot.
    console: str
    #: Wall time of the whole boot, command and shutdown, in seconds.
    seconds: float
    #: The host directory the guest could write to; result files are here.
    outdir: Path
    timed_out: bool = False
    #: Why the run was stopped (which budget, which test), when it was.
    stopped: str | None = None
    #: The guest's streamed pytest events, for a :meth:`TestVM.pytest` run.
    progress: Progress | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self, tail: int = 60) -> str:
        """A report for a failed assertion: why it stopped, what the guest tests did,
        and the ends of the outputs."""

        def last(text: str) -> str:
            return "\n".join(text.splitlines()[-tail:])

        what = "timed out" if self.timed_out else f"exit code {self.returncode}"
        parts = [f"VM command {what} after {self.seconds:.1f}s"]
        if self.stopped:
            parts.append(f"stopped: {self.stopped}")
        if self.progress is not None:
            parts.append(self.progress.summary())
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr), ("console", self.console)):
            if text.strip():
                parts.append(f"--- guest {name} (last {tail} lines) ---\n{last(text)}")
        return "\n".join(parts)


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestTests:
    """A pytest run inside the guest, with per-test outcomes from its streamed events."""

    result: VMResult
    #: ``nodeid`` → ``passed`` | ``failed`` | ``error`` | ``skipped``.
    outcomes: Mapping[str, str]
    #: ``nodeid`` → failure or skip message.
    messages: Mapping[str, str] = field(default_factory=dict)

    def failed(self) -> list[str]:
        return [n for n, o in self.outcomes.items() if o in ("failed", "error")]


def find_kernel(boot: Path = Path("/boot")) -> Path | None:
    """The newest Debian ``vmlinuz-*-amd64`` (the host's own kernel has no dm)."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for path in boot.glob("vmlinuz-*-amd64"):
        m = _KERNEL_RE.search(path.name)
        if m and os.access(path, os.R_OK):
            found.append((tuple(int(g) for g in m.groups()), path))
    return max(found)[1] if found else None


def _vng() -> str | None:
    here = Path(sys.executable).parent / "vng"
    return str(here) if here.exists() else shutil.which("vng")


def unavailable_reason() -> str | None:
    """Why the VM cannot run here, or None when it can."""
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    if find_kernel() is None:
        missing.append("a Debian kernel /boot/vmlinuz-*-amd64 (apt-get install linux-image-amd64)")
    if shutil.which("busybox") is None and not Path("/bin/busybox").exists():
        missing.append("busybox for the initramfs (apt-get install busybox-static)")
    if _vng() is None:
        missing.append("vng (pip install virtme-ng, or the 'testing' extra of snapcore)")
    if os.geteuid() != 0:
        missing.append("root (the guest runs as the host user, and dm needs root)")
    return ("the test VM cannot run: missing " + "; ".join(missing)) if missing else None


def _guest_script(command: str, cwd: str, outdir: str, env: Mapping[str, str]) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    venv_bin = str(Path(sys.executable).parent)
    return f"""#!/bin/sh
# written by snapcore.testing.vm; runs inside the guest as root
export DM_DISABLE_UDEV=1 SNAPCORE_IN_VM=1 SNAPCORE_VM_OUT={shlex.quote(outdir)}
export PATH={shlex.quote(venv_bin)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LC_ALL=C.UTF-8 LVM_SUPPRESS_FD_WARNINGS=1
{exports}modprobe -a {" ".join(GUEST_MODULES)} 2>/dev/null
cd {shlex.quote(cwd)} || exit 125
( {command} ) >{shlex.quote(outdir)}/stdout 2>{shlex.quote(outdir)}/stderr </dev/null
rc=$?
echo $rc >{shlex.quote(outdir)}/rc
exit $rc
"""


@dataclass(slots=True, kw_only=True)
class TestVM:
    """Boots Debian's kernel under qemu and runs one command per boot.

    ``memory`` and ``cpus`` are the guest's; ``workdir`` is the host directory under
    which each boot gets its own result directory (the guest's only writable host
    path, its ``SNAPCORE_VM_OUT``).
    """

    __test__ = False  # not a pytest test class, despite the name

    workdir: Path
    kernel: Path | None = None
    memory: str = "1G"
    #: One vCPU. Measured here (one boot each: two ``snapcore checkpoint`` of a thick
    #: LV, a recover): 72 s with one vCPU against 83 s with two on an idle host,
    #: and 95 s against 254 s with one host CPU kept busy, where two emulated
    #: vCPUs fight over the one core left (a guest lock held by a preempted vCPU
    #: spins the other) and every guest step runs ~2.7x slower.
    cpus: int = 1
    boots: int = 0
    boot_seconds: list[float] = field(default_factory=list)
    _cache: dict[tuple[str, ...], GuestTests] = field(default_factory=dict)

    def __post_init__(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise VMUnavailable(reason)
        if self.kernel is None:
            self.kernel = find_kernel()

    def argv(self, script: Path, outdir: Path) -> list[str]:
        vng = _vng()
        assert vng is not None and self.kernel is not None
        return [
            vng,
            "--run",
            str(self.kernel),
            "--disable-kvm",
            "--force-9p",
            "--memory",
            self.memory,
            "--cpus",
            str(self.cpus),
            f"--qemu-opts={QEMU_OPTS}",
            "--append",
            f"module_blacklist={MODULE_BLACKLIST}",
            f"--rwdir={outdir}",
            "--exec",
            f"sh {script}",
        ]

    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout: float = 300.0,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        budget: Budget | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> VMResult:
        """Boot, run ``command`` (a shell line, or an argv) as root, shut down.

        Returns the exit code and outputs; files the command writes under
        ``$SNAPCORE_VM_OUT`` are in ``result.outdir``. The run is killed, as a whole
        process group, after ``timeout`` seconds in all, or as soon as it overstays
        ``budget`` (read from the guest's streamed events; each is also passed to
        ``on_event`` as it arrives), or when ``stop`` is set (a run in a thread of
        its own whose session ends), or on any interrupt; then ``timed_out`` is set
        and ``stopped`` says why.
        """
        line = command if isinstance(command, str) else shlex.join(command)
        self.workdir.mkdir(parents=True, exist_ok=True)
        outdir = Path(tempfile.mkdtemp(prefix="boot-", dir=self.workdir))
        script = outdir / "run.sh"
        script.write_text(_guest_script(line, os.fspath(cwd or os.getcwd()), str(outdir), env or {}))
        host_env = dict(os.environ)
        host_env["PATH"] = f"{Path(sys.executable).parent}:{host_env.get('PATH', '/usr/bin:/bin')}"
        host_env["TMPDIR"] = str(outdir)  # virtme's own temporary files go with this boot
        with _BOOT_LOCK, _machine_lock():
            start = time.monotonic()
            progress = Progress(path=outdir / _EVENTS, launched=start)
            proc = subprocess.Popen(
                self.argv(script, outdir),
                stdin=subprocess.DEVNULL,  # a closed stdin crashes vng
                stdout=subprocess.PIPE,  # pipes, not one file: qemu reopens fd 1 and 2
                stderr=subprocess.PIPE,
                env=host_env,
                start_new_session=True,
            )
            out, err = _drain(proc.stdout), _drain(proc.stderr)
            stopped: str | None = None
            try:
                while True:
                    try:
                        proc.wait(timeout=0.25)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    now = time.monotonic()
                    progress.poll(now, on_event)
                    if now - start > timeout:
                        stopped = f"the whole run exceeded its {timeout:g}s"
                    elif stop is not None and stop.is_set():
                        stopped = "stopped: the test session ended first"
                    elif budget is not None:
                        stopped = budget.exceeded(progress, now)
                    if stopped:
                        break
            finally:
                _kill_group(proc)  # never leave a qemu behind, whatever happened
                out_text, err_text = out.text(), err.text()
            progress.poll(time.monotonic(), on_event)
            seconds = time.monotonic() - start
        self.boots += 1
        self.boot_seconds.append(seconds)
        timed_out = stopped is not None
        rc_file = outdir / "rc"
        returncode = proc.returncode
        if rc_file.exists():
            with contextlib.suppress(ValueError):
                returncode = int(rc_file.read_text().strip())
        elif not timed_out and returncode == 0:
            returncode = 125  # the guest never got to run the command
        return VMResult(
            returncode=returncode if not timed_out else -signal.SIGKILL,
            stdout=_read(outdir / "stdout"),
            stderr=_read(outdir / "stderr"),
            console=out_text + err_text,
            seconds=seconds,
            outdir=outdir,
            timed_out=timed_out,
            stopped=stopped,
            progress=progress if budget is not None else None,
        )

    def ran(self, args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None) -> bool:
        """Whether :meth:`pytest` already ran this selection (and will give it back)."""
        return (os.fspath(cwd or os.getcwd()), *args) in self._cache

    def pytest(
        self,
        args: Sequence[str],
        *,
        budget: Budget | None = None,
        timeout: float = 3600.0,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
    ) -> GuestTests:
        """Run a pytest selection in one boot; the same ``args`` twice reuse the boot.

        The guest streams each test's start and outcome to the host
        (:mod:`snapcore.testing.vmreport`); the run is held to ``budget`` (default:
        :class:`Budget`'s defaults) and, as a last resort, ``timeout`` in all. The
        guest cannot write to the checkout, so pytest's cache provider is off.
        """
        key = (os.fspath(cwd or os.getcwd()), *args)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        plugins = "-p no:cacheprovider -p snapcore.testing -p snapcore.testing.vmreport"
        line = f"python -m pytest {plugins} -rfEs " + shlex.join(args)
        result = self.run(
            line, timeout=timeout, cwd=cwd, env=env, budget=budget or Budget(), on_event=on_event, stop=stop
        )
        progress = result.progress
        assert progress is not None
        tests = GuestTests(result=result, outcomes=dict(progress.outcomes), messages=dict(progress.messages))
        self._cache[key] = tests
        return tests


class _drain:
    """Reads a pipe to the end in a thread (qemu blocks on a full pipe otherwise)."""

    def __init__(self, pipe: IO[bytes] | None) -> None:
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe: IO[bytes] | None) -> None:
        if pipe is None:
            return
        with pipe:
            for chunk in iter(lambda: pipe.read1(65536), b""):  # type: ignore[attr-defined]
                self.chunks.append(chunk)

    def text(self) -> str:
        self.thread.join(timeout=10)
        return b"".join(self.chunks).decode(errors="replace")


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """One VM at a time on this machine, across processes (two at once run 3x slower)."""
    fd = os.open(os.path.join(tempfile.gettempdir(), "snapcore-vm.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL vng's whole process group (vng → sh → virtme-run → qemu), then reap."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    # qemu, orphaned by its killed parents, is reaped by init: wait until the whole
    # group is gone, so that a caller never sees a qemu (not even a zombie) after us
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m snapcore.testing.vm CMD...``: run one command in the test VM (a debugging aid)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m snapcore.testing.vm 'shell command'", file=sys.stderr)
        return 2
    try:
        vm = TestVM(workdir=Path(tempfile.mkdtemp(prefix="snapcore-vm-")))
    except VMUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    result = vm.run(" ".join(args))
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"[vm] exit {result.returncode} in {result.seconds:.1f}s; files in {result.outdir}", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
