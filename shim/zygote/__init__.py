"""A node-wide parent that forks the pods' shim daemons, so that they share their code.

Every pod keeps a shim daemon of its own (a shim that fails, or that a hostile
guest keeps busy, is its pod's problem alone), but each of them would import
the same ~25 MiB of Python: asyncio and ssl, grpc, protobuf, pyroute2, qemu.qmp
and husk itself. The zygote imports all of it once and forks one daemon per
pod; the children share those pages with it copy-on-write. The collector is off
in the zygote and its objects are frozen (``gc.freeze``) before each fork, so
that collections in the children do not write to them (the pattern the gc
module's documentation gives for fork without exec).

``start`` (shim.manager) asks the zygote over a unix socket that only root may
use: one request per daemon, the daemon's flags, the bundle to run in, start's
environment and umask, and the listening socket it bound for the daemon (passed
as a file descriptor); the reply is the daemon's pid. The zygote is started by
the first ``start`` that finds none (under a lock file, so ten pods starting at
once start one), and it exits once it has had no daemon and no request for
shim.zygote.server.IDLE_EXIT_S. Its socket's name is a hash of the code it imported (husk's files
and its libraries' versions, the interpreter): an upgraded husk starts a new
zygote, and the old one leaves once its daemons are gone. Whatever keeps the
zygote from answering, ``start`` spawns the daemon as a new process instead
(``HUSK_SHIM_ZYGOTE=0`` in containerd's environment always does).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shim import SHIM_NAME

# start imports this module: no logging, ctypes or subprocess here (the server is
# shim.zygote.server).

ZYGOTE_DIR = Path("/run/husk/zygote")
DISABLE_ENV = "HUSK_SHIM_ZYGOTE"
# How long a zygote without daemons waits for a request before it exits (seconds).
IDLE_ENV = "HUSK_SHIM_ZYGOTE_IDLE_S"
# Set for a daemon spawned without the zygote: why (the daemon logs it).
FALLBACK_ENV = "HUSK_SHIM_ZYGOTE_UNUSED"
PROGRAM_TITLE = "husk-shim-zygote"
LOG_FILE = Path("/var/log/husk/zygote.log")

# Requests are small (flags, a path, containerd's environment); anything bigger is refused.
MAX_REQUEST_BYTES = 256 * 1024
REQUEST_TIMEOUT_S = 5.0
# The zygote's imports take ~1.5 s on an idle machine; ten pods starting on two
# busy cores make it several times that.
STARTUP_TIMEOUT_S = 30.0
STARTUP_POLL_S = 0.02
# Room in the zygote's argument area for the daemons' command lines (set_cmdline
# rewrites it in place and cannot grow it).
TITLE_ROOM = " " * 1024


class ZygoteUnavailable(Exception):
    """No zygote answered, or it refused or failed the request; spawn the daemon instead."""


@dataclass(frozen=True)
class DaemonRequest:
    """What a forked daemon needs of the ``start`` that asked for it."""

    flags: list[str]
    cwd: str
    env: dict[str, str]
    umask: int

    def encode(self) -> bytes:
        return json.dumps({"flags": self.flags, "cwd": self.cwd, "env": self.env,
                           "umask": self.umask}).encode()

    @classmethod
    def decode(cls, data: bytes) -> DaemonRequest:
        """:raise ValueError: not a request this zygote understands."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a request is a JSON object")
        flags, cwd, env, umask = raw.get("flags"), raw.get("cwd"), raw.get("env"), raw.get("umask")
        if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise ValueError("flags must be a list of strings")
        if not (isinstance(cwd, str) and os.path.isabs(cwd)):
            raise ValueError("cwd must be an absolute path")
        if not (isinstance(env, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise ValueError("env must map strings to strings")
        if not (isinstance(umask, int) and 0 <= umask <= 0o777):
            raise ValueError("umask must be 0..0o777")
        return cls(flags, cwd, env, umask)


# -- the key: which code a zygote runs -------------------------------------------

# One file of each library the daemon imports: an upgrade replaces it.
LIBRARY_MARKERS = ("grpc/__init__.py", "google/protobuf/__init__.py", "pyroute2/__init__.py",
                   "qemu/qmp/__init__.py", "psutil/__init__.py")


# A forked daemon lives where its zygote does: only a start in the same namespaces and
# cgroups may use one (a containerd in a network namespace of its own gets its own).
NAMESPACES = ("net", "mnt", "pid", "ipc", "uts", "cgroup", "user")


def placement(pid: int | str = "self") -> str:
    """The namespaces (by inode) and cgroups of process ``pid``.

    :raise OSError: the process is gone or cannot be examined.
    """
    parts = [f"{ns}:{os.stat(f'/proc/{pid}/ns/{ns}').st_ino}" for ns in NAMESPACES]
    with open(f"/proc/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
        parts.append(f.read(64 * 1024))
    return "\n".join(parts)


def code_key() -> str:
    """A hash of what the zygote would import (husk's own files and its libraries':
    path, size, mtime, inode of each; the interpreter) and of where it would run."""
    import hashlib

    digest = hashlib.sha256(f"{sys.executable}\0{sys.version}\0{placement()}\0".encode())

    def add(path: str) -> None:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())

    root = Path(__file__).resolve().parent.parent.parent
    for package in ("shim", "proto"):
        for dirpath, dirnames, filenames in os.walk(root / package):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(f for f in filenames if f.endswith(".py")):
                add(os.path.join(dirpath, name))
    for marker in LIBRARY_MARKERS:
        found = next((os.path.join(entry, marker) for entry in sys.path
                      if os.path.isfile(os.path.join(entry or ".", marker))), None)
        if found is not None:
            add(found)
    return digest.hexdigest()[:32]


def socket_path(key: str) -> Path:
    return ZYGOTE_DIR / f"{key}.sock"


# -- start's side --------------------------------------------------------------------


def spawn_daemon(flags: list[str], cwd: str, listener: socket.socket) -> int:
    """Have the zygote fork a daemon serving `listener`; start one first if none runs.

    :return: the daemon's pid.
    :raise ZygoteUnavailable: no zygote could be used (the caller spawns the daemon).
    """
    if os.environ.get(DISABLE_ENV, "1") == "0":
        raise ZygoteUnavailable(f"{DISABLE_ENV}=0")
    request = DaemonRequest(flags, cwd, dict(os.environ), _current_umask())
    key = code_key()
    path = socket_path(key)
    try:
        return _ask(path, request, listener)
    except ZygoteUnavailable:
        pass
    with _startup_lock(path):
        # Another start may have started it while this one waited for the lock.
        if not _answers(path):
            _launch(path, key)
    return _ask(path, request, listener)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        probe.settimeout(REQUEST_TIMEOUT_S)
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def _ask(path: Path, request: DaemonRequest, listener: socket.socket) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            conn.connect(str(path))
            socket.send_fds(conn, [request.encode()], [listener.fileno()])
            reply = json.loads(conn.recv(4096) or b"null")
        except (OSError, ValueError) as exc:
            raise ZygoteUnavailable(f"zygote {path}: {exc}") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("pid"), int):
        raise ZygoteUnavailable(f"zygote {path} refused: {reply!r}"[:500])
    return int(reply["pid"])


@contextlib.contextmanager
def _startup_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path.with_suffix(".lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ZygoteUnavailable(f"cannot open the zygote's lock file: {exc}") from exc
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ZygoteUnavailable("timed out waiting for another start to start the zygote")
                time.sleep(STARTUP_POLL_S)
        yield
    finally:
        os.close(fd)


def _launch(path: Path, key: str) -> None:
    """Start a zygote on `path` and wait until it listens."""
    import subprocess

    argv = [sys.executable, "-m", "shim.zygote.server", str(path), key, TITLE_ROOM]
    try:
        proc = subprocess.Popen(argv, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError as exc:
        raise ZygoteUnavailable(f"cannot start the zygote: {exc}") from exc
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _answers(path):
        if proc.poll() is not None:
            raise ZygoteUnavailable(f"the zygote exited with status {proc.returncode} "
                                    f"while starting (see {LOG_FILE})")
        if time.monotonic() > deadline:
            proc.kill()
            raise ZygoteUnavailable(f"the zygote did not listen within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(STARTUP_POLL_S)
