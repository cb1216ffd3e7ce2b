"""The shim's ``start`` and ``delete`` actions (containerd runs them as commands).

start: one daemon per pod. The socket address is derived from the pod's
sandbox id, so a pod's second container finds the running daemon and only
gets its address back. Otherwise the socket is bound here, before the
daemon is spawned with it, so containerd can connect the moment the address
is printed. Only the address goes to stdout (containerd reads it to EOF).

delete: containerd's cleanup after a dead shim: stop whatever is left of the
VM for this id, unmount and remove its files, and print a DeleteResponse.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shim.__main__ import ShimArgs

SOCKET_DIR = "/run/containerd/s"
ADDRESS_FILE = "address"
RUN_DIR_FILE = "husk-run-dir"
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
GROUP_LABEL = "io.containerd.runc.v2.group"
CONNECT_TIMEOUT_S = 1.0
SIGKILL_STATUS = 128 + signal.SIGKILL


def _annotations(bundle: Path) -> dict[str, str]:
    try:
        spec = json.loads((bundle / "config.json").read_text())
        return dict(spec.get("annotations") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def group_id(shim_id: str, annotations: dict[str, str]) -> str:
    """The pod this task belongs to: its sandbox id, or itself."""
    if annotations.get(GROUP_LABEL):
        return annotations[GROUP_LABEL]
    if annotations.get(CONTAINER_TYPE) == "container" and annotations.get(SANDBOX_ID):
        return annotations[SANDBOX_ID]
    return shim_id


def socket_address(containerd_address: str, namespace: str, group: str) -> str:
    """containerd's own scheme: unix:///run/containerd/s/<sha256(address/ns/id)>."""
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
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # stale: nobody answered on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock


def start(args: ShimArgs) -> int:
    bundle = Path.cwd()
    group = group_id(args.id, _annotations(bundle))
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
    argv = [sys.executable, "-m", "shim", "-namespace", args.namespace, "-address",
            args.address, "-publish-binary", args.publish_binary, "-id", group,
            "-socket", str(sock.fileno())] + (["-debug"] if args.debug else []) + ["serve"]
    try:
        subprocess.Popen(argv, cwd=bundle, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, pass_fds=(sock.fileno(),),
                         start_new_session=True)
    except OSError as exc:
        os.unlink(path)
        print(f"containerd-shim-husk-v2: cannot start the daemon: {exc}", file=sys.stderr)
        return 1
    sock.close()
    (bundle / ADDRESS_FILE).write_text(address)
    print(address, end="")
    return 0


def _kill_leftovers(run_dir: Path) -> None:
    """Kill QEMU and virtiofsd processes that still use ``run_dir``."""
    import psutil

    marker = str(run_dir)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(marker in part for part in cmdline) and proc.pid != os.getpid():
            try:
                proc.kill()
                proc.wait(5)
            except (psutil.Error, psutil.TimeoutExpired):
                pass


def _remove_dead_socket(bundle: Path) -> None:
    """A daemon killed outright leaves its socket; remove it once nobody answers."""
    try:
        path = (bundle / ADDRESS_FILE).read_text().strip().removeprefix("unix://")
    except OSError:
        return
    if path.startswith(SOCKET_DIR + "/") and os.path.exists(path) and not _can_connect(path):
        os.unlink(path)


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def delete(args: ShimArgs) -> int:
    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    warnings = []
    pid = 1  # containerd skips pid 0; the VM's pid when we still know it
    run_dir_file = bundle / RUN_DIR_FILE
    try:
        run_dir = Path(run_dir_file.read_text().strip())
    except OSError:
        run_dir = None
    if run_dir is not None and run_dir.is_absolute() and run_dir.parent.name == "sb":
        from shim.util.mount import umount_all

        target = run_dir if run_dir.name == args.id else run_dir / "shared" / args.id
        if target == run_dir:
            pid = _read_pid(run_dir / "qemu.pid") or pid
            _kill_leftovers(run_dir)
        warnings += umount_all(target)
        shutil.rmtree(target, ignore_errors=True)
    _remove_dead_socket(bundle)
    for warning in warnings:
        print(f"husk delete {args.id}: {warning}", file=sys.stderr)

    from proto.gen.containerd.task.v2 import shim_pb2

    response = shim_pb2.DeleteResponse(pid=pid, exit_status=SIGKILL_STATUS)
    response.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0
