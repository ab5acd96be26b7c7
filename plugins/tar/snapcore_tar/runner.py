"""Running GNU tar and rsync through ``sh``: background process, streamed stdout,
stderr kept for the error message, and the child killed if we give up on it.

Each command runs in a process group of its own (its compressor or ssh with it),
tied to the controller (it dies with it) and to the checkpoint's cancellation (a
SIGTERM to ``snapcore checkpoint`` kills the group at once)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapcore import BackendError, Cancelled, Target, tied_to_controller, tool_env
from snapcore_tar.common import tail
from snapcore_tar.progress import Progress

CHUNK = 1 << 20


@dataclass(slots=True)
class Result:
    exit_code: int
    stderr: str


def run(
    argv: Sequence[str],
    *,
    target: Target | None,
    backend: str,
    what: str,
    on_out: Callable[[str], None] | None = None,
    ok_codes: Sequence[int] = (0,),
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    hint: Callable[[], str] | None = None,
) -> Result:
    """Run ``argv``; stdout (latin-1, one character per byte) goes to ``on_out`` in chunks.

    A status outside ``ok_codes`` raises :class:`BackendError` with the command
    and the tail of its stderr, after ``hint()`` (what the tool does not say, such
    as a full disk).
    """
    import sh  # lazily: importing sh (and asyncio with it) costs ~20 ms at every CLI start

    mount = target.mount.mount_point if target is not None else None
    started = tied_to_controller(argv)
    command = sh.Command(started[0])
    kwargs: dict[str, Any] = {
        "_bg": True,
        "_new_group": True,
        "_bg_exc": False,
        "_tty_out": False,
        "_env": env or tool_env(),
        "_ok_code": list(ok_codes),
        "_encoding": "latin-1",
        "_decode_errors": "replace",
    }
    reader: _PipeReader | None = None
    if on_out is not None:
        # a pipe we read ourselves: sh's own callback thread adds ~100 ms per command
        reader = _PipeReader(on_out)
        kwargs["_out"] = reader.write_fd
    if timeout is not None:
        kwargs["_timeout"] = timeout
    try:
        try:
            proc = command(*started[1:], **kwargs)
        except sh.CommandNotFound as exc:  # pragma: no cover - the caller checked the tool
            raise BackendError(f"{argv[0]}: command not found", mount=mount, backend=backend) from exc
        finally:
            if reader is not None:
                reader.start()
        cancel = target.cancel if target is not None else None
        try:
            if cancel is None:
                proc.wait()
            else:
                with cancel.on_cancel(lambda: _kill_group(proc)):
                    proc.wait()
        except sh.ErrorReturnCode as exc:
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{what} stopped: the checkpoint was cancelled ({cancel.reason})") from None
            stderr = exc.stderr.decode("utf-8", "replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
            prefix = hint() if hint is not None else ""
            raise BackendError(
                f"{prefix}{what} failed (exit status {exc.exit_code}): {tail(stderr) or 'no message'} "
                f"[command: {' '.join(argv)}]",
                mount=mount,
                backend=backend,
            ) from exc
        except sh.TimeoutException as exc:
            raise BackendError(f"{what} timed out after {timeout:g} s", mount=mount, backend=backend) from exc
        except BaseException:
            _kill_group(proc)
            with contextlib.suppress(Exception):
                proc.wait()
            raise
    finally:
        if reader is not None:
            reader.finish()
    raw = proc.stderr
    stderr = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
    return Result(exit_code=int(proc.exit_code or 0), stderr=stderr)


def _kill_group(proc: Any) -> None:
    """SIGKILL the command's process group (tar and its compressor, rsync and ssh)."""
    with contextlib.suppress(Exception):
        proc.signal_group(9)


class _PipeReader:
    """The read end of a child's stdout, drained by a thread into ``on_out``."""

    def __init__(self, on_out: Callable[[str], None]) -> None:
        self.on_out = on_out
        self._read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._drain, name="snapcore-stdout", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        os.close(self.write_fd)  # the child has its copy: EOF comes when it exits
        self._thread.start()

    def _drain(self) -> None:
        try:
            while True:
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    return
                self.on_out(chunk.decode("latin-1"))
        except BaseException as exc:
            self.error = exc
            # keep draining so that the child never blocks on a full pipe
            while os.read(self._read_fd, 1 << 16):
                pass

    def finish(self) -> None:
        self._thread.join()
        os.close(self._read_fd)
        if self.error is not None:
            raise self.error


class SizeWatcher(threading.Thread):
    """Reports the growing size of a file being written, for the progress bar."""

    def __init__(self, path: Path, progress: Progress) -> None:
        super().__init__(name="snapcore-progress", daemon=True)
        self.path = path
        self.progress = progress
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.1):
            with contextlib.suppress(OSError):
                self.progress.set_bytes(self.path.stat().st_size)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def sha256_file(path: Path) -> str:
    """The sha256 of the regular file ``path``: never through a symlink, never of a
    FIFO or device (an export record may name one; ``/dev/zero`` never ends)."""
    import stat

    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    with open(fd, "rb", buffering=0) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


class LineCounter:
    """Counts lines of a tool's stdout (tar -v, rsync --out-format) for progress."""

    def __init__(self, progress: Progress | None, keep: bool = False) -> None:
        self.progress = progress
        self.count = 0
        self.keep = keep
        self.chunks: list[str] = []

    def __call__(self, chunk: str) -> None:
        n = chunk.count("\n")
        self.count += n
        if self.keep:
            self.chunks.append(chunk)
        if self.progress is not None and n:
            self.progress.add(files=n)

    def text(self) -> str:
        return "".join(self.chunks)
