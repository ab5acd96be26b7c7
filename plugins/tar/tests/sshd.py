"""A small real SSH server for the tests (asyncssh): ``python sshd.py HOST_KEY AUTHORIZED_KEYS``.

It listens on 127.0.0.1 (a free port, printed on the first line), accepts the keys
in ``AUTHORIZED_KEYS`` only, and runs each command a client asks for through the
shell, as the user it runs as, wiring the channel to the command's standard streams
(what ``rsync -e ssh`` needs: ``rsync --server ...`` on the far side). It serves until
killed. The client is the real OpenSSH ``ssh``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import asyncssh


async def _pump(
    read: Callable[[int], Awaitable[bytes]], write: Callable[[bytes], object], close: Callable[[], object] | None = None
) -> None:
    while True:
        chunk = await read(65536)
        if not chunk:
            break
        write(chunk)
    if close is not None:
        close()


async def _run(process: asyncssh.SSHServerProcess[bytes]) -> None:
    command = process.command or "true"
    proc = await asyncio.create_subprocess_shell(
        command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    feeding = asyncio.ensure_future(_pump(process.stdin.read, proc.stdin.write, proc.stdin.close))
    await asyncio.gather(_pump(proc.stdout.read, process.stdout.write), _pump(proc.stderr.read, process.stderr.write))
    code = await proc.wait()
    feeding.cancel()
    process.exit(code)


async def _serve(host_key: str, authorized: str) -> None:
    server = await asyncssh.listen(
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        authorized_client_keys=authorized,
        process_factory=_run,
        encoding=None,
        allow_scp=False,
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], sys.argv[2]))
