"""virtiofsd: exports the sandbox's shared directory to the guest over vhost-user."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from shim.util import child

log = logging.getLogger(__name__)

SOCKET_WAIT_S = 10.0
SOCKET_POLL_S = 0.01


class VirtiofsdError(Exception):
    """virtiofsd did not start."""


async def start_virtiofsd(binary: str, socket_path: Path, shared_dir: Path, cache: str,
                          log_path: Path, debug: bool = False) -> asyncio.subprocess.Process:
    """Start virtiofsd and wait until its socket exists.

    :raise VirtiofsdError: it cannot be executed, exits, or never creates the socket.
    """
    argv = [binary, f"--socket-path={socket_path}", "-o", f"source={shared_dir}",
            "-o", f"cache={cache}", "-o", "sandbox=chroot", "-o", "announce_submounts",
            "-o", "xattr", "-o", f"log_level={'debug' if debug else 'warn'}"]
    try:
        proc = await child.spawn(argv, log_path)
    except OSError as exc:
        raise VirtiofsdError(f"cannot run {binary}: {exc.strerror}") from exc
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_WAIT_S
    while not socket_path.exists():
        if proc.returncode is not None:
            raise VirtiofsdError(f"virtiofsd exited with status {proc.returncode}: "
                                 f"{child.log_tail(log_path)}")
        if loop.time() > deadline:
            await child.stop(proc, "virtiofsd")
            raise VirtiofsdError(f"virtiofsd did not create {socket_path} in {SOCKET_WAIT_S:.0f}s")
        await asyncio.sleep(SOCKET_POLL_S)
    log.debug("virtiofsd pid %d serves %s on %s", proc.pid, shared_dir, socket_path)
    return proc
