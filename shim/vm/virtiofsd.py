"""virtiofsd: exports the sandbox's shared directory to the guest over vhost-user.

The guest talks to virtiofsd directly, and virtiofsd runs as root, so it gets
what the C virtiofsd offers to contain it: its own mount, pid and network
namespaces with the shared directory as its root (``sandbox=namespace``), the
capabilities it needs to serve files and no more (no mknod, no setting file
capabilities), and no extended attributes unless asked for.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from shim.util import child

log = logging.getLogger(__name__)

SOCKET_WAIT_S = 10.0
SOCKET_POLL_S = 0.01
# Namespaces plus pivot_root into the shared dir. "chroot" is the fallback for
# hosts that forbid unsharing namespaces (virtiofsd inside a container).
SANDBOX_MODE = "namespace"
# From virtiofsd's default set: a guest has no business making device nodes
# or file capabilities on the host (the guest's /dev is its own tmpfs).
DROPPED_CAPS = ("mknod", "setfcap")


class VirtiofsdError(Exception):
    """virtiofsd did not start."""


def virtiofsd_argv(binary: str, socket_path: Path, shared_dir: Path, cache: str,
                   debug: bool = False, xattr: bool = False,
                   sandbox: str = SANDBOX_MODE) -> list[str]:
    modcaps = ":".join(f"-{cap}" for cap in DROPPED_CAPS)
    return [binary, f"--socket-path={socket_path}", "-o", f"source={shared_dir}",
            "-o", f"cache={cache}", "-o", f"sandbox={sandbox}", "-o", f"modcaps={modcaps}",
            "-o", "announce_submounts", "-o", "xattr" if xattr else "no_xattr",
            "-o", f"log_level={'debug' if debug else 'warn'}"]


async def start_virtiofsd(binary: str, socket_path: Path, shared_dir: Path, cache: str,
                          log_path: Path, debug: bool = False, xattr: bool = False,
                          pid_file: Path | None = None) -> asyncio.subprocess.Process:
    """Start virtiofsd and wait until its socket exists; its pid goes to ``pid_file``.

    :raise VirtiofsdError: it cannot be executed, exits, or never creates the socket.
    """
    argv = virtiofsd_argv(binary, socket_path, shared_dir, cache, debug, xattr)
    try:
        proc = await child.spawn(argv, log_path)
    except OSError as exc:
        raise VirtiofsdError(f"cannot run {binary}: {exc.strerror}") from exc
    try:
        if pid_file is not None:
            _write_pid_file(pid_file, proc.pid)
        await _wait_for_socket(proc, socket_path, log_path)
    except BaseException:
        await child.stop(proc, "virtiofsd")
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)
        raise
    log.debug("virtiofsd pid %d serves %s on %s", proc.pid, shared_dir, socket_path)
    return proc


def _write_pid_file(path: Path, pid: int) -> None:
    """For a cleanup after a dead shim (QEMU writes its own with -pidfile)."""
    try:
        path.write_text(f"{pid}\n")
    except OSError as exc:
        raise VirtiofsdError(f"cannot write {path}: {exc.strerror}") from exc


async def _wait_for_socket(proc: asyncio.subprocess.Process, socket_path: Path,
                           log_path: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_WAIT_S
    while not socket_path.exists():
        if proc.returncode is not None:
            raise VirtiofsdError(f"virtiofsd exited with status {proc.returncode}: "
                                 f"{child.log_tail(log_path)}")
        if loop.time() > deadline:
            raise VirtiofsdError(f"virtiofsd did not create {socket_path} in {SOCKET_WAIT_S:.0f}s")
        await asyncio.sleep(SOCKET_POLL_S)
