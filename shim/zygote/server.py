"""The zygote itself: imports what a shim daemon needs, then forks one per request.

See shim.zygote for why and for the protocol; ``python -m shim.zygote.server
PATH KEY`` is how ``start`` runs it.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import logging.handlers
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from shim import SHIM_NAME
from shim.util.proctitle import set_cmdline
from shim.zygote import (IDLE_ENV, LOG_FILE, MAX_REQUEST_BYTES, PROGRAM_TITLE,
                         REQUEST_TIMEOUT_S, DaemonRequest, placement)

log = logging.getLogger("shim.zygote")

# What the children are called in /proc/<pid>/comm (15 bytes), as an exec'd shim is.
CHILD_COMM = SHIM_NAME[:15]
LOG_MAX_BYTES = 1 << 20
IDLE_EXIT_S = float(os.environ.get(IDLE_ENV) or 60.0)
LOOP_WAKEUP_S = 5.0
# The modules a daemon imports, at its start or later (lazily, at its pod's first
# network setup, port forward, ...): all of them are loaded before the first fork.
PRELOAD = (
    "shim.daemon",
    "shim.network.setup",
    "shim.network.portforward",
    "shim.vm.cmdline",
    "pyroute2",
    "concurrent.futures.thread",  # asyncio's default executor, at the first to_thread
)

PR_SET_NAME = 15
# What a forked child writes once it is set up (anything else: why it is not).
READY = b"ready"
_libc = ctypes.CDLL(None, use_errno=True)


def _bind(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # the lock is held: a socket here is a dead zygote's
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def _peer(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return int(pid), int(uid)


def _receive(conn: socket.socket) -> tuple[DaemonRequest, int] | None:
    """One request and the listening socket it carries; None if the peer only
    connected (start checking that a zygote listens).

    :raise ValueError: a request that is malformed, too big or without one socket, or
        from another user or from other namespaces or cgroups than the zygote's.
    """
    data, fds, flags, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 2)
    if not data and not fds:
        return None
    try:
        peer_pid, peer_uid = _peer(conn)
        if peer_uid != os.geteuid():
            raise ValueError("only the zygote's own user may ask it")
        try:
            elsewhere = placement(peer_pid) != placement()
        except OSError as exc:
            raise ValueError(f"cannot see where the asking process runs: {exc}") from exc
        if elsewhere:
            raise ValueError("the asking process runs in other namespaces or cgroups than this "
                             "zygote (its daemon would not be where an exec'd one is)")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("request too big")
        if len(fds) != 1 or not stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
            raise ValueError("a request carries exactly one socket")
        return DaemonRequest.decode(data), fds[0]
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _become_daemon(request: DaemonRequest, listen_fd: int, ready_fd: int,
                   import_env: dict[str, str]) -> NoReturn:
    """In the forked child: turn into the pod's shim daemon, as if ``start`` had exec'd it.

    Once it is set up it says so on `ready_fd` (or why it could not be); then it
    serves, and never returns into the zygote's loop.
    """
    status = 1
    try:
        try:
            _set_up_as_daemon(request, listen_fd, ready_fd, import_env)
        except BaseException as exc:  # noqa: BLE001 - reported to the zygote, which tells start
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"cannot set up the daemon: {exc}"[:500].encode())
            raise
        os.write(ready_fd, READY)
        os.close(ready_fd)
        from shim import daemon
        from shim.__main__ import parse_args

        status = daemon.main(parse_args(sys.argv[1:]))
    except BaseException:  # noqa: BLE001 - a child must never return into the zygote's loop
        with contextlib.suppress(Exception):
            logging.getLogger("shim").exception("the forked shim daemon failed")
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
        os._exit(status)


def _set_up_as_daemon(request: DaemonRequest, listen_fd: int, ready_fd: int,
                      import_env: dict[str, str]) -> None:
    """What exec'ing the shim from start would have given it: its own session, no
    fd but stdio and its socket, start's directory, environment and umask, the
    shim's name and arguments, default signal handling."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)
        handler.close()
    os.setsid()
    for fd in (int(name) for name in os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in (listen_fd, ready_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
    os.chdir(request.cwd)
    os.umask(request.umask)
    os.environ.clear()
    os.environ.update(request.env)
    for name, value in import_env.items():  # what the imports set, start's env does not have
        os.environ.setdefault(name, value)
    _libc.prctl(PR_SET_NAME, CHILD_COMM.encode(), 0, 0, 0)
    sys.argv = [SHIM_NAME, *request.flags, "-socket", str(listen_fd), "serve"]
    set_cmdline(sys.argv)  # ps shows the shim at once (daemon.main sets it too, for an exec'd one)
    if "random" in sys.modules:
        sys.modules["random"].seed()  # not the zygote's sequence
    gc.enable()


def _wait_ready(ready_fd: int) -> str | None:
    """None once the child says it is set up; else why not."""
    ready, _, _ = select.select([ready_fd], [], [], REQUEST_TIMEOUT_S)
    if not ready:
        return f"the forked daemon was not set up within {REQUEST_TIMEOUT_S:.0f} s"
    message = os.read(ready_fd, 512)
    if message == READY:
        return None
    return message.decode(errors="replace") or "the forked daemon exited while being set up"


@dataclass
class Zygote:
    path: Path
    key: str
    listener: socket.socket
    identity: tuple[int, int]
    children: set[int]
    # What the preloaded modules set in the environment (they would have in an exec'd
    # daemon, whose environment start's replaces here).
    import_env: dict[str, str]

    def serve(self) -> None:
        wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        terminated = False
        idle_since = time.monotonic()
        while True:
            self._reap()
            if self.children:
                idle_since = time.monotonic()
            if not self._still_ours() or terminated:
                break
            if not self.children and time.monotonic() - idle_since >= IDLE_EXIT_S:
                break
            ready, _, _ = select.select([self.listener.fileno(), wakeup_r], [], [], LOOP_WAKEUP_S)
            if wakeup_r in ready:
                with contextlib.suppress(BlockingIOError):
                    terminated = signal.SIGTERM in os.read(wakeup_r, 64)
            if self.listener.fileno() in ready:
                self._accept()
                idle_since = time.monotonic()
        # No new requests: the socket goes first, then whoever already connected is served.
        self._unlink()
        self.listener.setblocking(False)
        while True:
            try:
                self._accept()
            except BlockingIOError:
                break
        self.listener.close()
        log.info("zygote %s exiting (%d daemons still running)", self.key, len(self.children))

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                received = _receive(conn)
            except (OSError, ValueError) as exc:
                log.warning("refused a request: %s", exc)
                with contextlib.suppress(OSError):
                    conn.send(json.dumps({"error": str(exc)[:500]}).encode())
                return
            if received is None:
                return
            request, listen_fd = received
            ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
            try:
                gc.freeze()
                pid = os.fork()
                if pid == 0:
                    _become_daemon(request, listen_fd, ready_w, self.import_env)
                os.close(ready_w)
                failed = _wait_ready(ready_r)
            finally:
                os.close(listen_fd)
                os.close(ready_r)
            self.children.add(pid)
            reply: dict[str, object] = {"pid": pid}
            if failed:
                log.warning("shim daemon %d (%s): %s", pid, " ".join(request.flags)[:300], failed)
                reply = {"error": failed}
            else:
                log.info("forked shim daemon %d (%s)", pid, " ".join(request.flags)[:300])
            with contextlib.suppress(OSError):
                conn.send(json.dumps(reply).encode())

    def _reap(self) -> None:
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.children.discard(pid)
                log.info("shim daemon %d exited (%s)", pid, _describe(status))

    def _still_ours(self) -> bool:
        """False once the socket file is gone or replaced (a new zygote took the path)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self.identity

    def _unlink(self) -> None:
        if self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str]) -> int:
    # Before the imports: the objects they create stay where they are (no
    # collection moves or frees them before they are frozen and shared).
    gc.disable()
    path, key = Path(argv[0]), argv[1]
    set_cmdline([PROGRAM_TITLE, str(path)])
    _libc.prctl(PR_SET_NAME, PROGRAM_TITLE[:15].encode(), 0, 0, 0)
    with contextlib.suppress(OSError):
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
    # Two lines per pod for as long as the node runs: bounded, one old file kept.
    handlers: list[logging.Handler] = []
    with contextlib.suppress(OSError):
        handlers.append(logging.handlers.RotatingFileHandler(
            LOG_FILE, maxBytes=LOG_MAX_BYTES, backupCount=1))
    logging.basicConfig(level=logging.INFO, handlers=handlers or [logging.NullHandler()],
                        format="%(asctime)s husk-zygote[%(process)d] %(levelname)s: %(message)s")
    started = time.monotonic()
    env_before = dict(os.environ)
    for module in PRELOAD:
        __import__(module)
    listener = _bind(path)
    st = os.stat(path)
    log.info("zygote %s serving on %s (%d modules loaded in %.2f s)", key, path,
             len(sys.modules), time.monotonic() - started)
    import_env = {k: v for k, v in os.environ.items() if env_before.get(k) != v}
    Zygote(path, key, listener, (st.st_dev, st.st_ino), set(), import_env).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
