"""husk-agent end to end on the host: a real agent process, real crun, a busybox rootfs.

The agent runs as a subprocess with --transport none, in a private mount and
UTS namespace (its hostname and mounts stay there), and is driven through the
generated gRPC stub. The host uses cgroup v1 with a hybrid cgroup2 mount that
crun 1.8 refuses; inside the agent's private mount namespace that cgroup2
mount is detached, so crun runs in plain v1 mode (and StatsContainer reads the
v1 files).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from proto.gen import agent_pb2 as pb
from proto.gen import agent_pb2_grpc
from tests.rootfs import make_busybox_rootfs

REPO = Path(__file__).resolve().parents[2]
AGENT_START_TIMEOUT_S = 15.0
AGENT_STOP_TIMEOUT_S = 15.0
RPC_TIMEOUT_S = 20.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Run inside `unshare --mount`. v1: crun refuses the host's hybrid cgroup2 mount,
# so it is detached. v2: a cgroup2 mount hides the v1 hierarchies (this host's
# cgroup2 has no cpu/memory/pids controllers, but crun and the core files work).
NAMESPACE_SETUP = {
    "v1": 'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"',
    "v2": 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"',
}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="crun and mount namespaces need root"),
    pytest.mark.skipif(shutil.which("crun") is None, reason="crun is not installed"),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """A short temp dir (socket paths must fit sockaddr_un) with the shared dir and a rootfs."""
    path = Path(tempfile.mkdtemp(prefix="husk-agent-", dir="/tmp"))
    make_busybox_rootfs(path / "shared" / "busybox" / "rootfs")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    assert not path.exists()


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    stub: agent_pb2_grpc.AgentServiceStub
    shared: Path
    state: Path
    rootfs: Path
    cgroup_parent: str
    resolv_conf: Path

    def spec(self, args: list[str], *, terminal: bool = False, root: str | None = None,
             mounts: list[dict[str, Any]] | None = None) -> str:
        return make_spec(root or str(self.rootfs), args, terminal=terminal, extra_mounts=mounts)

    async def run(self, container_id: str, args: list[str], **kw: Any) -> int:
        """Create and start a container; returns its init pid."""
        resp = await self.stub.CreateContainer(pb.CreateContainerRequest(
            container_id=container_id, oci_spec_json=self.spec(args, **kw)), timeout=RPC_TIMEOUT_S)
        start = await self.stub.StartContainer(pb.ContainerRequest(container_id=container_id),
                                               timeout=RPC_TIMEOUT_S)
        assert start.pid == resp.pid > 0
        return resp.pid

    async def read(self, container_id: str, stream: int = pb.STDOUT, exec_id: str = "") -> bytes:
        chunks = []
        call = self.stub.ReadOutput(pb.ReadOutputRequest(container_id=container_id,
                                                         exec_id=exec_id, stream=stream),
                                    timeout=RPC_TIMEOUT_S)
        async for chunk in call:
            chunks.append(chunk.data)
        return b"".join(chunks)

    async def wait(self, container_id: str, exec_id: str = "") -> int:
        resp = await self.stub.WaitProcess(pb.ProcessRequest(container_id=container_id,
                                                             exec_id=exec_id),
                                           timeout=RPC_TIMEOUT_S)
        return resp.exit_status

    async def remove(self, container_id: str) -> None:
        await self.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id),
                                        timeout=RPC_TIMEOUT_S)


def make_spec(root: str, args: list[str], *, terminal: bool = False,
              extra_mounts: list[dict[str, Any]] | None = None) -> str:
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": ["PATH=/bin:/sbin:/usr/bin", "TERM=xterm", "HOME=/root"], "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
            "apparmorProfile": "cri-containerd.apparmor.d",
        },
        "root": {"path": root, "readonly": True},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
            *(extra_mounts or []),
        ],
        # Host-side parts the agent must drop: hooks, namespace paths, the netns.
        "hooks": {"prestart": [{"path": "/nonexistent/hook"}]},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                           {"type": "network", "path": "/proc/1/ns/net"}],
            "cgroupsPath": "/kubepods/should-be-replaced",
            "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
        },
    }
    return json.dumps(spec)


def _processes_in(marker: str, exclude: int = 0) -> list[str]:
    """Processes (but ``exclude``) whose cgroup or command line mentions ``marker``."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid == exclude:
            continue
        try:
            cgroups = Path(f"/proc/{p.pid}/cgroup").read_text()
        except OSError:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cgroups or marker in cmd:
            found.append(f"{p.pid}: {cmd[:120]}")
    return found


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _remove_cgroups(parent: str) -> None:
    for directory in CGROUP_ROOT.glob(f"*/{parent}"):
        for child in sorted(directory.glob("*/"), reverse=True):
            if child.is_dir():
                child.rmdir()
        directory.rmdir()


@pytest.fixture
async def agent(workdir: Path) -> AsyncIterator[Agent]:
    async with running_agent(workdir, "v1") as a:
        yield a


@pytest.fixture
async def agent_v2(workdir: Path) -> AsyncIterator[Agent]:
    if not (CGROUP_ROOT / "cgroup.controllers").exists() and \
            not (CGROUP_ROOT / "unified" / "cgroup.controllers").exists():
        pytest.skip("no cgroup2 on this host")
    async with running_agent(workdir, "v2") as a:
        yield a


@contextlib.asynccontextmanager
async def running_agent(workdir: Path, cgroups: str) -> AsyncIterator[Agent]:
    """A running agent with a sandbox; afterwards nothing of it may remain."""
    name = secrets.token_hex(3)
    state = workdir / f"s-{name}"
    cgroup_parent = f"husk-test-{name}"
    resolv = state / "resolv.conf"
    sock = state / "agent.sock"
    log_path = workdir / f"agent-{name}.log"
    cmd = ["unshare", "--mount", "--uts", "--propagation", "private", "--",
           "sh", "-c", NAMESPACE_SETUP[cgroups], "agent-ns",
           sys.executable, "-m", "agent", "--transport", "none", "--listen", f"unix:{sock}",
           "--state-dir", str(state), "--shared-dir", str(workdir / "shared"),
           "--cgroup-parent", cgroup_parent, "--resolv-conf", str(resolv), "--debug"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    # Dial only once the socket accepts: a failed first dial would put the
    # channel into gRPC's reconnect backoff (a second or more).
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while not _accepts(sock):
        assert proc.poll() is None, f"agent exited:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, "the agent did not start"
        await asyncio.sleep(0.02)
    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        resp = await stub.Check(pb.CheckRequest(), timeout=AGENT_START_TIMEOUT_S,
                                wait_for_ready=True)
        assert resp.status == pb.CheckResponse.SERVING
        await stub.CreateSandbox(pb.CreateSandboxRequest(
            sandbox_id="sb1", hostname="husk-pod", dns=["nameserver 10.0.0.53", "search test"]),
            timeout=RPC_TIMEOUT_S)
        yield Agent(proc, stub, workdir / "shared", state,
                    workdir / "shared" / "busybox" / "rootfs", cgroup_parent, resolv)

        # DestroySandbox must leave no container process behind, with the agent still up.
        await stub.DestroySandbox(pb.DestroySandboxRequest(sandbox_id="sb1"), timeout=RPC_TIMEOUT_S)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children == [], f"left after DestroySandbox: {children}"
        assert _processes_in(cgroup_parent, exclude=proc.pid) == []
    finally:
        await channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(AGENT_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log_text = log_path.read_text(errors="replace")
        log_path.unlink()
        shutil.rmtree(state, ignore_errors=True)
        leftovers = _processes_in(cgroup_parent) + _processes_in(str(state))
        _remove_cgroups(cgroup_parent)
    assert rc == 0, f"agent exit status {rc}:\n{log_text}"
    assert "Traceback" not in log_text, log_text
    assert leftovers == []
    assert not state.exists()


async def _code(coro: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code()


async def test_output_exit_code_and_guest_view(agent: Agent) -> None:
    """stdout/stderr content, the exit code, and the rewritten spec as the container sees it."""
    script = ("echo out; echo err >&2; hostname; readlink /proc/self/ns/net; "
              "cat /proc/self/cgroup; exit 3")
    await agent.run("c1", ["sh", "-c", script])
    out, err, status = await asyncio.gather(agent.read("c1"), agent.read("c1", pb.STDERR),
                                            agent.wait("c1"))
    assert status == 3
    assert err == b"err\n"
    lines = out.decode().splitlines()
    assert lines[:2] == ["out", "box"]
    # No network namespace of its own: the VM's (here: the agent's) network.
    assert lines[2] == os.readlink(f"/proc/{agent.proc.pid}/ns/net")
    assert f"/{agent.cgroup_parent}/c1" in out.decode()
    assert "kubepods" not in out.decode()
    assert agent.resolv_conf.read_text() == "nameserver 10.0.0.53\nsearch test\n"
    # A second wait returns the same status; the output streams stay at their end.
    assert await agent.wait("c1") == 3
    assert await agent.read("c1") == b""
    await agent.remove("c1")
    assert await _code(agent.wait("c1")) == grpc.StatusCode.NOT_FOUND


async def test_the_agent_loads_no_tls(agent: Agent) -> None:
    """It serves no TLS: asyncio's optional ssl import (OpenSSL set up, ~1.2 MiB of
    every guest) is kept out of the agent's process."""
    assert "python" in Path(f"/proc/{agent.proc.pid}/exe").resolve().name
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "_ssl." not in maps and "libssl" not in maps


async def test_fast_exit_loses_no_output(agent: Agent) -> None:
    """Output of a process that already exited is still delivered, beyond the buffer size."""
    await agent.run("fast", ["sh", "-c", "echo hello; echo bye >&2"])
    assert await agent.wait("fast") == 0
    assert await agent.read("fast") == b"hello\n"
    assert await agent.read("fast", pb.STDERR) == b"bye\n"
    # 3 MiB through a 1 MiB buffer: the writer is back-pressured, nothing is dropped.
    size = 3 * 1024 * 1024
    await agent.run("big", ["sh", "-c", f"yes abcdefg | head -c {size}"])
    await asyncio.sleep(0.3)
    data = await agent.read("big")
    assert len(data) == size
    assert data == (b"abcdefg\n" * (size // 8 + 1))[:size]
    assert await agent.wait("big") == 0


async def test_signal_kill_status(agent: Agent) -> None:
    await agent.run("sleeper", ["sleep", "100"])
    pids = (await agent.stub.ListProcesses(pb.ContainerRequest(container_id="sleeper"))).pids
    assert len(pids) == 1
    await agent.stub.SignalProcess(pb.SignalProcessRequest(container_id="sleeper", signal=9))
    assert await agent.wait("sleeper") == 128 + 9
    # The init is gone: signalling it again is NotFound.
    assert await _code(agent.stub.SignalProcess(pb.SignalProcessRequest(
        container_id="sleeper", signal=15))) == grpc.StatusCode.NOT_FOUND


async def test_exec_into_running_container(agent: Agent) -> None:
    await agent.run("host", ["sleep", "100"])
    process = json.loads(agent.spec(["sh", "-c", "echo exec $0 $(hostname); echo e2 >&2; exit 5",
                                     "one"]))["process"]
    resp = await agent.stub.ExecProcess(pb.ExecProcessRequest(
        container_id="host", exec_id="e1", process_json=json.dumps(process)))
    assert resp.pid > 0
    out, err, status = await asyncio.gather(agent.read("host", exec_id="e1"),
                                            agent.read("host", pb.STDERR, exec_id="e1"),
                                            agent.wait("host", "e1"))
    assert (out, err, status) == (b"exec one box\n", b"e2\n", 5)

    # A long exec: its id is taken while it runs, and it can be signalled.
    process["args"] = ["sleep", "100"]
    await agent.stub.ExecProcess(pb.ExecProcessRequest(
        container_id="host", exec_id="e2", process_json=json.dumps(process)))
    assert await _code(agent.stub.ExecProcess(pb.ExecProcessRequest(
        container_id="host", exec_id="e2", process_json=json.dumps(process)))) == \
        grpc.StatusCode.ALREADY_EXISTS
    await agent.stub.SignalProcess(pb.SignalProcessRequest(container_id="host", exec_id="e2",
                                                           signal=15))
    assert await agent.wait("host", "e2") == 128 + 15
    assert await _code(agent.wait("host", "nope")) == grpc.StatusCode.NOT_FOUND
    # The container's init is unaffected.
    stats = await agent.stub.StatsContainer(pb.ContainerRequest(container_id="host"))
    assert stats.pids_current == 1
    await agent.remove("host")


async def test_stdin_round_trip(agent: Agent) -> None:
    await agent.run("cat", ["cat"])
    reading = asyncio.ensure_future(agent.read("cat"))
    payload = b"hello agent\n" + bytes(range(256)) * 512  # > one pipe buffer
    written = await agent.stub.WriteStdin(pb.WriteStdinRequest(container_id="cat", data=payload))
    assert written.written == len(payload)
    await agent.stub.CloseStdin(pb.ProcessRequest(container_id="cat"))
    assert await reading == payload
    assert await agent.wait("cat") == 0
    assert await _code(agent.stub.WriteStdin(pb.WriteStdinRequest(
        container_id="cat", data=b"x"))) == grpc.StatusCode.FAILED_PRECONDITION


async def test_tty_init_and_exec(agent: Agent) -> None:
    await agent.run("tty", ["sh", "-c", "tty; read x; stty size; echo got $x; sleep 100"],
                    terminal=True)
    stdout = agent.stub.ReadOutput(pb.ReadOutputRequest(container_id="tty", stream=pb.STDOUT))
    await agent.stub.TtyWinResize(pb.TtyWinResizeRequest(container_id="tty", rows=33, columns=101))
    await agent.stub.WriteStdin(pb.WriteStdinRequest(container_id="tty", data=b"go\n"))
    seen = b""
    async for chunk in stdout:
        seen += chunk.data
        if b"got go" in seen:
            break
    stdout.cancel()
    text = seen.decode().replace("\r\n", "\n")
    assert "/dev/pts/0\n" in text
    assert "33 101\n" in text
    # A tty has everything on stdout: stderr is empty and already at its end.
    assert await agent.read("tty", pb.STDERR) == b""

    process = json.loads(agent.spec(["sh", "-c", "read x; tty; stty size"], terminal=True))
    await agent.stub.ExecProcess(pb.ExecProcessRequest(
        container_id="tty", exec_id="t", process_json=json.dumps(process["process"])))
    await agent.stub.TtyWinResize(pb.TtyWinResizeRequest(container_id="tty", exec_id="t",
                                                         rows=12, columns=34))
    await agent.stub.WriteStdin(pb.WriteStdinRequest(container_id="tty", exec_id="t", data=b"\n"))
    out = (await agent.read("tty", exec_id="t")).decode()
    assert "/dev/pts/" in out and "12 34" in out
    assert await agent.wait("tty", "t") == 0
    await agent.stub.SignalProcess(pb.SignalProcessRequest(container_id="tty", signal=9))
    assert await agent.wait("tty") == 137
    await agent.remove("tty")


async def test_two_containers_at_once(agent: Agent) -> None:
    await agent.run("a", ["sh", "-c", "read x; echo a got $x; exit 1"])
    await agent.run("b", ["sh", "-c", "read x; echo b got $x; exit 2"])
    await agent.stub.WriteStdin(pb.WriteStdinRequest(container_id="b", data=b"bee\n"))
    await agent.stub.WriteStdin(pb.WriteStdinRequest(container_id="a", data=b"ay\n"))
    results = await asyncio.gather(agent.read("a"), agent.read("b"), agent.wait("a"),
                                   agent.wait("b"))
    assert results == [b"a got ay\n", b"b got bee\n", 1, 2]
    # The sandbox is destroyed with both containers still present (the fixture checks).


async def test_removed_container_is_gone_and_its_id_free(agent: Agent) -> None:
    """RemoveContainer answers once the processes are gone; crun delete runs behind it,
    and a container of the same id waits for that instead of failing."""
    pid = await agent.run("again", ["sleep", "100"])
    await agent.remove("again")
    assert not psutil.pid_exists(pid)
    await agent.run("again", ["sh", "-c", "echo back"])
    assert await agent.read("again") == b"back\n"
    assert await agent.wait("again") == 0
    await agent.remove("again")


async def test_malformed_specs_are_rejected(agent: Agent) -> None:
    bad = [
        "not json",
        "[1, 2]",
        json.dumps({"process": {"args": []}, "root": {"path": str(agent.rootfs)}}),
        json.dumps({"process": {"args": ["sh", 1]}, "root": {"path": str(agent.rootfs)}}),
        json.dumps({"process": {"args": ["sh"]}}),
        agent.spec(["sh"], mounts=[{"destination": "relative", "type": "tmpfs"}]),
        agent.spec(["sh"], mounts=[{"destination": "/a/../b", "type": "tmpfs"}]),
    ]
    for i, spec in enumerate(bad):
        err = await _code(agent.stub.CreateContainer(pb.CreateContainerRequest(
            container_id=f"bad{i}", oci_spec_json=spec)))
        assert err == grpc.StatusCode.INVALID_ARGUMENT, spec
    assert await _code(agent.stub.CreateContainer(pb.CreateContainerRequest(
        container_id="../x", oci_spec_json=agent.spec(["sh"])))) == grpc.StatusCode.INVALID_ARGUMENT
    # crun's own error (no such binary) comes back as a failure, not a dead agent.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.run("nobin", ["/no/such/binary"])
    assert "no/such/binary" in info.value.details()
    assert (await agent.stub.Check(pb.CheckRequest())).status == pb.CheckResponse.SERVING
    await agent.run("good", ["true"])
    assert await agent.wait("good") == 0


async def test_unknown_container_and_state_errors(agent: Agent) -> None:
    nf = grpc.StatusCode.NOT_FOUND
    assert await _code(agent.stub.StartContainer(pb.ContainerRequest(container_id="x"))) == nf
    assert await _code(agent.wait("x")) == nf
    assert await _code(agent.read("x")) == nf
    assert await _code(agent.stub.SignalProcess(pb.SignalProcessRequest(
        container_id="x", signal=9))) == nf
    assert await _code(agent.stub.RemoveContainer(pb.RemoveContainerRequest(
        container_id="x"))) == nf
    assert await _code(agent.stub.CreateSandbox(pb.CreateSandboxRequest(
        sandbox_id="again"))) == grpc.StatusCode.ALREADY_EXISTS

    await agent.stub.CreateContainer(pb.CreateContainerRequest(
        container_id="st", oci_spec_json=agent.spec(["sleep", "100"])))
    assert await _code(agent.stub.CreateContainer(pb.CreateContainerRequest(
        container_id="st", oci_spec_json=agent.spec(["true"])))) == grpc.StatusCode.ALREADY_EXISTS
    process = json.loads(agent.spec(["true"]))["process"]
    fp = grpc.StatusCode.FAILED_PRECONDITION
    assert await _code(agent.stub.ExecProcess(pb.ExecProcessRequest(
        container_id="st", exec_id="e", process_json=json.dumps(process)))) == fp
    await agent.stub.StartContainer(pb.ContainerRequest(container_id="st"))
    assert await _code(agent.stub.StartContainer(pb.ContainerRequest(container_id="st"))) == fp
    await agent.stub.PauseContainer(pb.ContainerRequest(container_id="st"))
    assert await _code(agent.stub.PauseContainer(pb.ContainerRequest(container_id="st"))) == fp
    await agent.stub.ResumeContainer(pb.ContainerRequest(container_id="st"))
    assert await _code(agent.stub.ExecProcess(pb.ExecProcessRequest(
        container_id="st", exec_id="e", process_json='{"args": "sh"}'))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    await agent.remove("st")


async def test_paths_escaping_the_shared_root(agent: Agent) -> None:
    escape = str(agent.shared / ".." / ".." / "etc")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await agent.stub.CreateContainer(pb.CreateContainerRequest(
            container_id="esc", oci_spec_json=make_spec(escape, ["sh"])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    link = agent.shared / "evil"
    link.symlink_to("/")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await agent.stub.CreateContainer(pb.CreateContainerRequest(
                container_id="esc", oci_spec_json=make_spec(str(link), ["sh"])))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "path escaping the rootfs" in info.value.details()
        for source in ("/etc", str(link / "etc")):
            mount = {"destination": "/data", "type": "bind", "source": source,
                     "options": ["rbind", "ro"]}
            assert await _code(agent.stub.CreateContainer(pb.CreateContainerRequest(
                container_id="esc", oci_spec_json=agent.spec(["sh"], mounts=[mount])))) == \
                grpc.StatusCode.INVALID_ARGUMENT
    finally:
        link.unlink()
    # A bind source inside the shared dir is fine.
    volume = agent.shared / "vol"
    volume.mkdir(exist_ok=True)
    (volume / "f").write_text("shared file\n")
    try:
        mount = {"destination": "/data", "type": "bind", "source": str(volume),
                 "options": ["rbind", "ro"]}
        await agent.run("vol", ["cat", "/data/f"], mounts=[mount])
        assert await agent.read("vol") == b"shared file\n"
        assert await agent.wait("vol") == 0
        await agent.remove("vol")
    finally:
        shutil.rmtree(volume)


async def test_stats_update_and_guest_details(agent: Agent) -> None:
    await agent.run("st", ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; "
                                       "echo done; sleep 100"])
    out = agent.stub.ReadOutput(pb.ReadOutputRequest(container_id="st"))
    async for chunk in out:
        assert chunk.data == b"done\n"
        break
    out.cancel()
    await agent.stub.UpdateContainer(pb.UpdateContainerRequest(
        container_id="st", resources_json=json.dumps({"pids": {"limit": 50}})))
    stats = await agent.stub.StatsContainer(pb.ContainerRequest(container_id="st"))
    # cgroup v1 on this host: the agent's v1 fallback (cgroup2 is what the guest reads).
    assert stats.cpu_usage_ns > 0
    assert stats.memory_usage_bytes > 0
    assert stats.pids_current == 1
    assert stats.pids_limit == 50
    assert await _code(agent.stub.UpdateContainer(pb.UpdateContainerRequest(
        container_id="st", resources_json="[]"))) == grpc.StatusCode.INVALID_ARGUMENT
    details = await agent.stub.GetGuestDetails(pb.Empty())
    assert details.oci_runtime_version.startswith("crun version")
    assert details.cpus >= 1 and details.memory_bytes > 0
    assert details.kernel_release == os.uname().release
    await agent.remove("st")


async def test_cgroup_v2_container(agent_v2: Agent) -> None:
    """crun and the agent on cgroup2, as in the guest: stats from cpu.stat,
    ListProcesses from cgroup.procs, pause through cgroup.freeze."""
    agent = agent_v2
    await agent.run("v2", ["sh", "-c", "cat /proc/self/cgroup; i=0; "
                                       "while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 100"])
    out = agent.stub.ReadOutput(pb.ReadOutputRequest(container_id="v2"))
    async for chunk in out:
        assert f"0::/{agent.cgroup_parent}/v2" in chunk.data.decode()
        break
    out.cancel()
    pids = (await agent.stub.ListProcesses(pb.ContainerRequest(container_id="v2"))).pids
    assert len(pids) >= 1
    await agent.stub.PauseContainer(pb.ContainerRequest(container_id="v2"))
    freeze = CGROUP_ROOT / "unified" / agent.cgroup_parent / "v2" / "cgroup.freeze"
    if freeze.exists():  # the same hierarchy, seen from the host
        assert freeze.read_text().strip() == "1"
    await agent.stub.ResumeContainer(pb.ContainerRequest(container_id="v2"))
    await asyncio.sleep(0.2)
    stats = await agent.stub.StatsContainer(pb.ContainerRequest(container_id="v2"))
    assert stats.cpu_usage_ns > 0 and stats.cpu_usage_ns % 1000 == 0  # usec → ns
    await agent.stub.SignalProcess(pb.SignalProcessRequest(container_id="v2", signal=9,
                                                           all=True))
    assert await agent.wait("v2") == 137
    await agent.remove("v2")
