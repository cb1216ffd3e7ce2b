"""The shim's ``start`` and ``delete`` actions (containerd runs them as commands).

start: one daemon per pod. The socket address is derived from the pod's
sandbox id, so a pod's second container finds the running daemon and only
gets its address back. Otherwise the socket is bound here, before the
daemon is spawned with it, so containerd can connect the moment the address
is printed. The daemon is forked by the node's zygote (shim.zygote), which
has imported what a daemon runs, so the pods' daemons share that memory;
without one, it is spawned as a new process. Only the address goes to stdout
(containerd 1.6 reads stdout and stderr together as the address).

delete: containerd's cleanup after a dead shim: stop whatever is left of the
VM for this id, unmount and remove its files, and print a DeleteResponse.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from proto import wire
from shim import SHIM_NAME
from shim.__main__ import ShimArgs
from shim.ids import SANDBOXES_DIR, is_valid_id

# containerd waits for ``delete`` on every task's removal and for ``start`` on
# every task's creation: hashlib (OpenSSL), subprocess and protobuf are imported
# only by the paths that need them, and DeleteResponse is written by hand.

SOCKET_DIR = "/run/containerd/s"
ADDRESS_FILE = "address"
RUN_DIR_FILE = "husk-run-dir"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
GROUP_LABEL = "io.containerd.runc.v2.group"
CONNECT_TIMEOUT_S = 1.0
SIGKILL_STATUS = 128 + signal.SIGKILL


class StartError(Exception):
    """start cannot go on; the message is for containerd's log."""


def _annotations(bundle: Path) -> dict[str, str]:
    try:
        spec = json.loads((bundle / "config.json").read_text())
        return dict(spec.get("annotations") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def group_id(shim_id: str, annotations: dict[str, str]) -> str:
    """The pod this task belongs to: its sandbox id, or itself.

    :raise StartError: the id is not a containerd id (it names files and sockets).
    """
    group = shim_id
    if annotations.get(GROUP_LABEL):
        group = annotations[GROUP_LABEL]
    elif annotations.get(CONTAINER_TYPE) == "container" and annotations.get(SANDBOX_ID):
        group = annotations[SANDBOX_ID]
    if not is_valid_id(group):
        raise StartError(f"invalid pod id {group[:200]!r} (from {GROUP_LABEL}, "
                         f"{SANDBOX_ID} or -id)")
    return group


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """containerd's own scheme: unix:///run/containerd/s/<sha256(address/ns/id)>."""
    import hashlib

    digest = hashlib.sha256(os.path.join(containerd_address, namespace, group).encode())
    return f"unix://{SOCKET_DIR}/{digest.hexdigest()}"


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_TIMEOUT_S)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _bind(path: str) -> socket.socket:
    """Listen on ``path``, mode 0600 from the start (only containerd's uid may connect)."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # stale: nobody answered on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


def daemon_flags(args: ShimArgs, group: str) -> list[str]:
    """The daemon's flags, but for the socket it serves (its fd number is the daemon's)."""
    flags = ["-namespace", args.namespace, "-id", group, "-address", args.address,
             "-publish-binary", args.publish_binary]
    return flags + (["-debug"] if args.debug else [])


def daemon_argv(args: ShimArgs, group: str, fd: int) -> list[str]:
    """The command line of a daemon spawned without the zygote: the shim's own
    program, so that ``ps`` and ``pgrep containerd-shim`` show it as every other
    shim (``containerd-shim-husk-v2 -namespace … -id …``), as a forked one is."""
    flags = [*daemon_flags(args, group), "-socket", str(fd)]
    program = sys.argv[0] if sys.argv else ""
    if os.path.basename(program) == SHIM_NAME and os.access(program, os.X_OK):
        return [os.path.abspath(program), *flags, "serve"]
    return [sys.executable, "-m", "shim", *flags, "serve"]


def _spawn_daemon(args: ShimArgs, group: str, bundle: Path, sock: socket.socket) -> None:
    """Fork the daemon from the zygote, or else start it as a new process.

    :raise OSError: the daemon could not be started at all.
    """
    from shim import zygote

    try:
        zygote.spawn_daemon(daemon_flags(args, group), str(bundle), sock)
        return
    except (zygote.ZygoteUnavailable, OSError) as exc:  # OSError: its dir, files, /proc
        why = str(exc)[:1000]  # the daemon logs it (start's stderr would spoil the address)
    import subprocess

    subprocess.Popen(daemon_argv(args, group, sock.fileno()), cwd=bundle,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
                     start_new_session=True, env={**os.environ, zygote.FALLBACK_ENV: why})


def start(args: ShimArgs) -> int:
    bundle = Path.cwd()
    try:
        group = group_id(args.id, _annotations(bundle))
    except StartError as exc:
        print(f"{SHIM_NAME}: {exc}", file=sys.stderr)
        return 1
    address = socket_address(args.address, args.namespace, group)
    path = address.removeprefix("unix://")
    if group != args.id and _can_connect(path):
        (bundle / ADDRESS_FILE).write_text(address)
        print(address, end="")
        return 0
    try:
        sock = _bind(path)
    except OSError as exc:
        print(f"containerd-shim-husk-v2: cannot listen on {path}: {exc}", file=sys.stderr)
        return 1
    try:
        _spawn_daemon(args, group, bundle, sock)
    except OSError as exc:
        os.unlink(path)
        print(f"containerd-shim-husk-v2: cannot start the daemon: {exc}", file=sys.stderr)
        return 1
    sock.close()
    (bundle / ADDRESS_FILE).write_text(address)
    print(address, end="")
    return 0


def _remove_dead_socket(bundle: Path) -> None:
    """A daemon killed outright leaves its socket; remove it once nobody answers."""
    try:
        path = (bundle / ADDRESS_FILE).read_text().strip().removeprefix("unix://")
    except OSError:
        return
    if path.startswith(SOCKET_DIR + "/") and os.path.exists(path) and not _can_connect(path):
        os.unlink(path)


def _run_dir(bundle: Path) -> Path | None:
    """The sandbox run dir the daemon named in the bundle, if it looks like one."""
    try:
        text = (bundle / RUN_DIR_FILE).read_text()[:4096].strip()
    except OSError:
        return None
    run_dir = Path(text)
    if (not run_dir.is_absolute() or run_dir.parent.name != SANDBOXES_DIR
            or not is_valid_id(run_dir.name) or ".." in run_dir.parts):
        return None
    return run_dir


def delete(args: ShimArgs) -> int:
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    warnings = []
    pid = 1  # containerd skips pid 0; the VM's pid when we still know it
    run_dir = _run_dir(bundle)
    # A daemon that stopped cleanly removed its run dir: nothing is left, and the
    # clean-up's imports (~100 ms) would be on the path of every pod's stop.
    if run_dir is not None and os.path.lexists(run_dir) and is_valid_id(args.id):
        from shim.sandbox.leftovers import clean_up

        result = clean_up(run_dir, args.id)
        pid = result.vm_pid or pid
        warnings += result.warnings
    _remove_dead_socket(bundle)
    for warning in warnings:
        print(f"husk delete {args.id}: {warning}", file=sys.stderr)

    sys.stdout.buffer.write(delete_response(pid, SIGKILL_STATUS, time.time_ns()))
    sys.stdout.flush()
    return 0


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse: pid = 1, exit_status = 2, exited_at = 3."""
    return (wire.varint_field(1, pid) + wire.varint_field(2, exit_status)
            + wire.length_delimited_field(3, wire.timestamp(exited_at_ns)))
