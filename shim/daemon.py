"""The shim daemon: one per pod, serving containerd.task.v2.Task over ttrpc.

Builds the object graph (publisher → task service → ttrpc server on the
socket the manager bound), wires logging to containerd's ``log`` FIFO and a
per-sandbox file, and exits after Shutdown or SIGTERM once the VM is down.
SIGUSR1 logs every task's and thread's stack (a daemon that seems stuck).
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from proto.gen.containerd.task.v2 import shim_pb2
from shim import SHIM_NAME
from shim.__main__ import ShimArgs
from shim.config import ConfigError, RuntimeConfig, load_config
from shim.task.events import Publisher
from shim.task.service import TaskService
from shim.ttrpc.server import Server
from shim.ttrpc.services import ServiceRegistry
from shim.util import podlogs
from shim.util.malloc import fix_mmap_threshold
from shim.util.proctitle import set_cmdline
from shim.util.stackdump import stack_dump
from shim.zygote import DISABLE_ENV, FALLBACK_ENV
from shim.zygote import LOG_FILE as ZYGOTE_LOG

log = logging.getLogger("shim")


LOG_FIFO = "log"
LOG_DIR = Path("/var/log/husk")
LOG_FORMAT = "%(asctime)s husk[%(process)d] %(levelname)s %(name)s: %(message)s"
# Only containerd (same uid; the server checks peer credentials as well) may connect.
SOCKET_MODE = 0o600


@dataclass(frozen=True)
class SocketFile:
    """The socket file this daemon serves, by identity: its path may be re-bound
    by another daemon (a new pod with the same address) after this one stops."""

    path: str
    dev: int
    ino: int


def claim_socket_file(path: str) -> SocketFile:
    """Record the identity of the socket file at `path` and make it mode SOCKET_MODE.

    :raise OSError: `path` cannot be examined or changed, or is not a socket.
    """
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} is not a socket")
    if stat.S_IMODE(st.st_mode) != SOCKET_MODE:
        # chmod follows symlinks; the lstat just before has seen a socket, and the
        # socket directory is writable by root only.
        os.chmod(path, SOCKET_MODE)
        log.info("socket %s was mode %o; now %o", path, stat.S_IMODE(st.st_mode), SOCKET_MODE)
    return SocketFile(path, st.st_dev, st.st_ino)


def unlink_socket_file(owned: SocketFile) -> bool:
    """Remove `owned.path` if it still is the socket that was claimed; return whether it was.

    Anything else found there (another daemon's socket, a file, nothing) stays.

    :raise OSError: the file cannot be examined or removed.
    """
    try:
        st = os.lstat(owned.path)
    except FileNotFoundError:
        return False
    if not (stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (owned.dev, owned.ino)):
        log.info("socket %s has been replaced since this daemon started; leaving it", owned.path)
        return False
    os.unlink(owned.path)
    return True


def _socket_path(sock: socket.socket) -> str | None:
    """The file a unix socket is bound to; None for an abstract or unnamed one."""
    name = sock.getsockname()
    if isinstance(name, str) and name and not name.startswith("\0"):
        return name
    return None


def _setup_logging(shim_id: str, debug: bool) -> Path | None:
    """stderr → containerd's log FIFO (in the bundle); also a per-sandbox file."""
    handlers: list[logging.Handler] = []
    try:
        fd = os.open(LOG_FIFO, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        os.dup2(fd, 2)
        os.close(fd)
        handlers.append(logging.StreamHandler(sys.stderr))
    except OSError:
        pass  # not started by containerd (no FIFO): the file alone will do
    log_file = None
    no_file: OSError | None = None
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        path = LOG_DIR / f"{shim_id}.log"
        file_handler = logging.FileHandler(path)
        try:
            # For life: marks the file as a live shim's. Unmarked, the pruner could
            # remove it under the pod, so the shim does not write to it at all.
            podlogs.hold(path)
        except OSError:
            file_handler.close()
            raise
        handlers.append(file_handler)
        log_file = path
    except OSError as exc:
        no_file = exc
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=LOG_FORMAT,
                        handlers=handlers or [logging.NullHandler()], force=True)
    if no_file is not None:
        log.warning("shim %s logs only to containerd's log: no file in %s (%s)",
                    shim_id, LOG_DIR, no_file)
    # qemu.qmp logs every QMP message at DEBUG and each disconnect at INFO: too much.
    logging.getLogger("qemu.qmp").setLevel(logging.INFO if debug else logging.WARNING)
    # grpc's DEBUG is a line per call ("Loaded running loop").
    logging.getLogger("grpc").setLevel(logging.INFO if debug else logging.WARNING)
    return log_file


def _prune_old_logs(keep_days: int) -> None:
    try:
        pruned = podlogs.prune(LOG_DIR, keep_days, keep_names=frozenset({ZYGOTE_LOG.name}))
    except OSError as exc:
        log.warning("cannot prune old logs in %s: %s", LOG_DIR, exc)
        return
    if pruned is not None and pruned.removed:
        log.info("removed %d logs of shims that exited over %d days ago (or beyond the "
                 "newest %d) from %s", len(pruned.removed), keep_days, podlogs.KEEP_MAX_FILES,
                 LOG_DIR)


async def serve(args: ShimArgs) -> int:
    without_zygote = os.environ.pop(FALLBACK_ENV, None)
    if without_zygote is not None:
        report = log.info if without_zygote == f"{DISABLE_ENV}=0" else log.warning
        report("this shim was started as a new process, not forked by the zygote "
                    "(it shares no memory with other pods' shims): %s", without_zygote)
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    if not ttrpc_address:
        log.warning("TTRPC_ADDRESS is not set: events cannot reach containerd")
    publisher = Publisher(ttrpc_address, args.namespace)
    publisher.start()
    done = asyncio.Event()
    owned: SocketFile | None = None
    try:
        config_path = None
        registry = ServiceRegistry()
        service = TaskService(args.id, args.namespace, publisher, done.set, config_path,
                              rpc_stats=registry.stats)
        unsupported = registry.register_service(
            shim_pb2.DESCRIPTOR.services_by_name["Task"], service)
        if unsupported:
            log.info("Task RPCs answered Unimplemented: %s", ", ".join(unsupported))
        server = Server(registry)
        sock = socket.socket(fileno=int(args.socket))
        socket_path = _socket_path(sock)
        if socket_path is not None:
            try:
                owned = claim_socket_file(socket_path)
            except OSError as exc:
                # Still serve (the manager bound it for us); just never remove it.
                log.warning("cannot claim socket file %s: %s", socket_path, exc)
        await server.serve_socket(sock)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        # As containerd's runc shim: SIGUSR1 writes where everything waits to the log.
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.info(
            "stack dump (SIGUSR1): %s", stack_dump()))
        log.info("shim %s serving (pid %d)", args.id, os.getpid())
        await done.wait()
        if service.pod is not None:
            await service.pod.shutdown()
            service.pod = None
        await server.shutdown()
    finally:
        await publisher.close()
        # The manager bound it; nobody else removes it once this daemon is gone.
        # By identity: another daemon may have bound the same path meanwhile.
        if owned is not None:
            try:
                unlink_socket_file(owned)
            except OSError as exc:
                log.warning("cannot remove socket %s: %s", owned.path, exc)
    log.info("shim %s exiting", args.id)
    return 0


def main(args: ShimArgs) -> int:
    # `ps`/`pgrep -f` show "containerd-shim-husk-v2 -namespace … -id …", like every shim.
    set_cmdline([SHIM_NAME, *sys.argv[1:]])
    fix_mmap_threshold()  # large transient buffers (the RAM copy) go back when freed
    debug = args.debug
    log_keep_days = RuntimeConfig.log_keep_days
    try:
        runtime = load_config().runtime
        debug = debug or runtime.debug
        log_keep_days = runtime.log_keep_days
    except ConfigError:
        pass
    log_file = _setup_logging(args.id, debug)
    if log_file is not None:
        _prune_old_logs(log_keep_days)
    try:
        return asyncio.run(serve(args))
    except Exception:
        log.exception("shim %s failed", args.id)
        return 1
