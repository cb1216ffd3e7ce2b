"""The shim zygote (shim.zygote): real zygotes forking real shim daemons.

Each test gets its own zygote directory, so the zygotes here are theirs alone;
the daemons are driven over ttrpc as containerd drives them (Connect, Shutdown).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from proto.gen.containerd.task.v2 import shim_pb2
from shim import manager, zygote
from shim.__main__ import parse_args
from shim.ttrpc.client import Client

TASK_SERVICE = "containerd.task.v2.Task"
WAIT_S = 30.0


@pytest.fixture
def zygote_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private zygote directory (short: unix socket paths); its zygotes and their
    daemons are killed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="zyg", dir="/run"))
    monkeypatch.setattr(zygote, "ZYGOTE_DIR", path)
    monkeypatch.delenv(zygote.DISABLE_ENV, raising=False)
    yield path
    for proc in zygotes_in(path):
        for child in proc.children():
            child.kill()
        proc.kill()
    shutil.rmtree(path, ignore_errors=True)


def zygotes_in(directory: Path) -> list[psutil.Process]:
    """The zygotes serving a socket in `directory` (their title names it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline[:1] == [zygote.PROGRAM_TITLE] and cmdline[1:2] and \
                Path(cmdline[1]).parent == directory:
            found.append(proc)
    return found


def bound_listener(directory: Path, name: str) -> socket.socket:
    return manager._bind(str(directory / f"{name}.sock"))


def flags(shim_id: str) -> list[str]:
    return ["-namespace", "zygote-test", "-id", shim_id, "-address", "/nonexistent.sock",
            "-publish-binary", "/bin/true"]


def spawn(directory: Path, shim_id: str, bundle: Path) -> int:
    with bound_listener(directory, shim_id) as listener:
        return zygote.spawn_daemon(flags(shim_id), str(bundle), listener)


async def _call(path: str, method: str, request: object, response_type: type) -> object:
    async with await Client.connect(path, timeout=WAIT_S) as client:
        return await client.call(TASK_SERVICE, method, request, response_type, timeout=WAIT_S)


def shut_down(directory: Path, shim_id: str) -> None:
    from google.protobuf import empty_pb2

    asyncio.run(_call(str(directory / f"{shim_id}.sock"), "Shutdown",
                      shim_pb2.ShutdownRequest(id=shim_id), empty_pb2.Empty))


def wait_gone(pid: int, zombie_ok: bool = False) -> None:
    """Until `pid` is gone for good: exited and reaped (a zombie still counts, unless
    `zombie_ok`: a zygote this test process started is its child, not start's)."""
    deadline = time.monotonic() + WAIT_S
    while psutil.pid_exists(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            status = psutil.Process(pid).status()
            if zombie_ok and status == psutil.STATUS_ZOMBIE:
                return
            assert time.monotonic() < deadline, f"{pid} is still there ({status})"
        time.sleep(0.05)


def wait_for_text(path: Path, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.05)


def test_a_forked_daemon_is_the_pods_shim(zygote_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTRPC_ADDRESS", "/nonexistent.sock.ttrpc")
    logs = {n: Path(f"/var/log/husk/{n}.log") for n in ("pod1", "pod2")}
    for log in logs.values():
        log.unlink(missing_ok=True)
    pid = spawn(zygote_dir, "pod1", tmp_path)
    daemon = psutil.Process(pid)
    parent = daemon.parent()
    assert parent is not None and parent.cmdline()[0] == zygote.PROGRAM_TITLE
    # Where and as what start would have exec'd it.
    assert daemon.cwd() == str(tmp_path)
    assert Path(f"/proc/{pid}/comm").read_text() == "containerd-shim\n"  # pgrep's name
    assert " ".join(daemon.cmdline()).startswith(
        "containerd-shim-husk-v2 -namespace zygote-test -id pod1 ")
    # It holds the socket start bound, and nothing of the zygote's.
    zygote_socket = str(zygote.socket_path(zygote.code_key()))
    assert zygote_socket in [c.laddr for c in parent.net_connections("unix")]
    assert zygote_socket not in [c.laddr for c in daemon.net_connections("unix")]
    # Another pod's daemon comes from the same zygote, with its own start's environment
    # (not the one the zygote was started with): the daemon says what it misses.
    monkeypatch.delenv("TTRPC_ADDRESS")
    other = spawn(zygote_dir, "pod2", tmp_path)
    assert psutil.Process(other).ppid() == parent.pid and other != pid
    wait_for_text(logs["pod2"], "TTRPC_ADDRESS is not set")
    assert "TTRPC_ADDRESS is not set" not in logs["pod1"].read_text()
    for shim_id, daemon_pid in (("pod1", pid), ("pod2", other)):
        shut_down(zygote_dir, shim_id)  # answered by the daemon, which then exits
        wait_gone(daemon_pid)  # and is reaped by the zygote: no zombie left
        logs[shim_id].unlink()
    assert parent.is_running()


def test_pods_starting_at_once_start_one_zygote(zygote_dir: Path, tmp_path: Path) -> None:
    pids: list[int] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            pids.append(spawn(zygote_dir, f"c{i}", tmp_path))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert not errors and len(pids) == 4
    assert len({psutil.Process(p).ppid() for p in pids}) == 1
    assert len(zygotes_in(zygote_dir)) == 1
    for pid in pids:
        os.kill(pid, signal.SIGKILL)  # a shim killed outright is reaped as well
        wait_gone(pid)


def test_bad_requests_are_refused_and_the_zygote_goes_on(zygote_dir: Path, tmp_path: Path) -> None:
    pid = spawn(zygote_dir, "ok1", tmp_path)
    path = str(zygote.socket_path(zygote.code_key()))
    a_socket = socket.socket(socket.AF_UNIX)
    requests: list[tuple[bytes, list[int]]] = [
        (b"{}", []),  # no socket
        (b"not json", [a_socket.fileno()]),
        (json.dumps({"flags": ["-id", "x"], "cwd": "relative", "env": {}, "umask": 18}).encode(),
         []),
    ]
    with open("/dev/null", "rb") as not_a_socket:
        good = zygote.DaemonRequest(flags("x"), "/", {}, 0o22).encode()
        requests.append((good, [not_a_socket.fileno()]))
        for data, fds in requests:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.settimeout(WAIT_S)
                conn.connect(path)
                socket.send_fds(conn, [data], fds)
                reply = json.loads(conn.recv(4096))
            assert "error" in reply and "pid" not in reply, data
    a_socket.close()
    second = spawn(zygote_dir, "ok2", tmp_path)
    assert psutil.Process(second).ppid() == psutil.Process(pid).ppid()
    for p in (pid, second):
        os.kill(p, signal.SIGKILL)
        wait_gone(p)


def test_an_idle_zygote_leaves_and_takes_its_socket(zygote_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(zygote.IDLE_ENV, "1")
    pid = spawn(zygote_dir, "idle", tmp_path)
    parent = psutil.Process(pid).parent()
    assert parent is not None
    time.sleep(2)
    assert parent.is_running(), "a zygote with a daemon must stay"
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    wait_gone(parent.pid, zombie_ok=True)
    assert not zygote.socket_path(zygote.code_key()).exists()


def test_start_spawns_the_daemon_itself_when_no_zygote_answers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(zygote.DISABLE_ENV, "0")
    with pytest.raises(zygote.ZygoteUnavailable, match="HUSK_SHIM_ZYGOTE=0"):
        zygote.spawn_daemon([], str(tmp_path), socket.socket(socket.AF_UNIX))
    spawned: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: spawned.append((argv, kw["env"])))
    args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "pod1", "start"])
    with socket.socket(socket.AF_UNIX) as sock:
        manager._spawn_daemon(args, "pod1", tmp_path, sock)
    [(argv, env)] = spawned
    assert argv[-1] == "serve" and argv[argv.index("-id") + 1] == "pod1"
    assert env[zygote.FALLBACK_ENV] == "HUSK_SHIM_ZYGOTE=0"  # the daemon logs why


@pytest.mark.parametrize("raw", [
    "[]",
    '{"flags": "-id x", "cwd": "/", "env": {}, "umask": 18}',
    '{"flags": [], "cwd": "bundle", "env": {}, "umask": 18}',
    '{"flags": [], "cwd": "/", "env": {"A": 1}, "umask": 18}',
    '{"flags": [], "cwd": "/", "env": {}, "umask": 4096}',
    '{"flags": [], "cwd": "/", "env": {}}',
])
def test_malformed_requests_do_not_decode(raw: str) -> None:
    with pytest.raises(ValueError):
        zygote.DaemonRequest.decode(raw.encode())


def test_a_request_survives_its_encoding() -> None:
    request = zygote.DaemonRequest(["-id", "p"], "/run/b", {"PATH": "/bin", "É": "ü"}, 0o27)
    assert zygote.DaemonRequest.decode(request.encode()) == request


def test_the_key_names_the_code_and_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    key = zygote.code_key()
    assert key == zygote.code_key() and len(key) == 32
    monkeypatch.setattr(sys, "executable", "/another/python3")
    assert zygote.code_key() != key


def _in_new_netns(code: str) -> str:
    """Run Python ``code`` in a network namespace of its own; its stdout."""
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=WAIT_S * 2, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_start_in_another_network_namespace_gets_a_daemon_there(zygote_dir: Path,
                                                                  tmp_path: Path) -> None:
    """As containerd in a netns of its own (the rbd tests' does): its shims must see its
    127.0.0.1, so its start may not use a zygote of the host's namespace."""
    ours = spawn(zygote_dir, "host1", tmp_path)
    code = f"""
import os, socket
from pathlib import Path
from shim import manager, zygote
zygote.ZYGOTE_DIR = Path({str(zygote_dir)!r})
d = Path({str(zygote_dir)!r})
# The host's zygote refuses a request from here...
with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn, manager._bind(str(d / "x.sock")) as lst:
    conn.connect({str(zygote.socket_path(zygote.code_key()))!r})
    socket.send_fds(conn, [zygote.DaemonRequest(["-id", "x"], "/", {{}}, 18).encode()], [lst.fileno()])
    print(conn.recv(4096).decode())
# ...and start here gets a zygote (and a daemon) of this namespace.
with manager._bind(str(d / "ns1.sock")) as lst:
    pid = zygote.spawn_daemon({flags("ns1")!r}, {str(tmp_path)!r}, lst)
print(pid, os.stat("/proc/self/ns/net").st_ino)
"""
    refusal, placed = _in_new_netns(code).splitlines()
    assert "other namespaces" in json.loads(refusal)["error"]
    pid, netns = map(int, placed.split())
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns != os.stat("/proc/self/ns/net").st_ino
    assert psutil.Process(pid).ppid() != psutil.Process(ours).ppid()  # another zygote
    for p in (pid, ours):
        os.kill(p, signal.SIGKILL)
        wait_gone(p)


def test_start_falls_back_when_the_zygote_dir_cannot_be_used(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def unusable(*_: object) -> int:
        raise PermissionError(13, "Permission denied", "/run/husk/zygote")
    monkeypatch.setattr(zygote, "spawn_daemon", unusable)
    spawned: list[dict[str, str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: spawned.append(kw["env"]))
    args = parse_args(["-namespace", "k8s.io", "-address", "/c.sock", "-id", "pod1", "start"])
    with socket.socket(socket.AF_UNIX) as sock:
        manager._spawn_daemon(args, "pod1", tmp_path, sock)
    [env] = spawned
    assert "Permission denied" in env[zygote.FALLBACK_ENV]
