"""TaskService over a VM-less pod: RPC semantics, event order, error codes, stdio."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest
from google.protobuf.message import Message

from proto.gen.containerd.cgroups.v1 import metrics_pb2
from proto.gen.containerd.task.v2 import shim_pb2 as api
from proto.gen.containerd.types.task import task_pb2 as task_types
from shim.config import Config
from shim.sandbox.description import PodDescription
from shim.task.service import TaskService
from shim.ttrpc.errors import Code, TtrpcError
from tests.fakes.sandbox import FAKE_VM_PID, FakeSandbox

SANDBOX = "sb1"


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[Message] = []

    def publish(self, event: Message) -> None:
        self.events.append(event)

    def topics(self) -> list[str]:
        return [type(e).__name__ for e in self.events]


def _bundle(root: Path, cid: str, annotations: dict[str, str],
            mounts: list[dict[str, Any]] | None = None) -> Path:
    bundle = root / "bundles" / cid
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "process": {"args": ["/bin/sh"], "cwd": "/"},
            "root": {"path": "rootfs"}, "annotations": annotations, "mounts": mounts or [],
            "linux": {"namespaces": [{"type": "network", "path": str(root / "netns")}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


@pytest.fixture
async def env(tmp_path: Path) -> Any:
    publisher = RecordingPublisher()
    sandboxes: list[FakeSandbox] = []
    shutdowns: list[bool] = []

    def factory(pod: PodDescription, config: Config) -> FakeSandbox:
        sandboxes.append(FakeSandbox(pod, config, tmp_path))
        return sandboxes[-1]

    service = TaskService(SANDBOX, "k8s.io", publisher, lambda: shutdowns.append(True),
                          str(tmp_path / "none.toml"), sandbox_factory=factory)  # type: ignore[arg-type]
    (tmp_path / "none.toml").write_text("")

    class Env:
        pass
    e = Env()
    e.service, e.publisher, e.sandboxes, e.shutdowns, e.root = (
        service, publisher, sandboxes, shutdowns, tmp_path)
    yield e
    if service.pod is not None:
        await service.pod.shutdown()
    from shim.util.mount import mounts_under
    assert mounts_under(tmp_path) == [], "the test left mounts behind"


async def _run_pod(e: Any) -> None:
    bundle = _bundle(e.root, SANDBOX, {"io.kubernetes.cri.container-type": "sandbox",
                                       "io.kubernetes.cri.sandbox-name": "web"})
    reply = await e.service.create(api.CreateTaskRequest(id=SANDBOX, bundle=str(bundle)))
    assert reply.pid == FAKE_VM_PID
    await e.service.start(api.StartRequest(id=SANDBOX))


async def _create(e: Any, cid: str, stdout: str = "", mounts: Any = None) -> Path:
    bundle = _bundle(e.root, cid, {"io.kubernetes.cri.container-type": "container",
                                   "io.kubernetes.cri.sandbox-id": SANDBOX}, mounts)
    await e.service.create(api.CreateTaskRequest(id=cid, bundle=str(bundle), stdout=stdout))
    return bundle


async def test_sandbox_lifecycle_and_event_order(env: Any) -> None:
    await _run_pod(env)
    assert env.sandboxes[0].pod.hostname == "web"
    assert env.sandboxes[0].pod.netns_path == str(env.root / "netns")
    state = await env.service.state(api.StateRequest(id=SANDBOX))
    assert state.status == task_types.RUNNING and state.pid == FAKE_VM_PID
    waiter = asyncio.create_task(env.service.wait(api.WaitRequest(id=SANDBOX)))
    await env.service.kill(api.KillRequest(id=SANDBOX, signal=9))
    assert (await waiter).exit_status == 137
    await env.service.delete(api.DeleteRequest(id=SANDBOX))
    assert env.sandboxes[0].stopped
    assert env.publisher.topics() == ["TaskCreate", "TaskStart", "TaskExit", "TaskDelete"]
    await env.service.shutdown(api.ShutdownRequest(id=SANDBOX))
    assert env.shutdowns == [True]


async def test_a_sandbox_delete_containerd_stops_waiting_for_still_stops_the_vm(
        env: Any) -> None:
    """containerd's deadline cancels the Delete mid-teardown: the VM goes anyway, and the
    shim, which will get no Shutdown, ends itself."""
    await _run_pod(env)
    box = env.sandboxes[0]
    release = asyncio.Event()
    plain_stop = box.stop

    async def slow_stop() -> None:  # a guest slow to answer DestroySandbox
        await release.wait()
        await plain_stop()
    box.stop = slow_stop
    await env.service.kill(api.KillRequest(id=SANDBOX, signal=9))
    delete = asyncio.create_task(env.service.delete(api.DeleteRequest(id=SANDBOX)))
    await asyncio.sleep(0.05)
    delete.cancel()
    with pytest.raises(asyncio.CancelledError):
        await delete
    assert not box.stopped and env.shutdowns == []
    release.set()
    for _ in range(100):
        if env.shutdowns:
            break
        await asyncio.sleep(0.01)
    assert box.stopped and env.shutdowns == [True] and env.service.pod is None


async def test_container_output_exit_and_cleanup(env: Any) -> None:
    await _run_pod(env)
    fifo = env.root / "stdout.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    hosts = env.root / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    await _create(env, "c1", stdout=str(fifo), mounts=[
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind", "ro"]},
        {"destination": "/dev/shm", "type": "bind", "source": "/nonexistent/shm", "options": ["rbind"]}])
    agent = env.sandboxes[0].agent
    spec = agent.proc("c1").spec
    assert spec["root"]["path"] == "/run/husk/shared/c1/rootfs"
    assert spec["mounts"][0]["source"] == "/run/husk/shared/c1/volumes/0"
    assert spec["mounts"][1]["source"] == "/run/husk/pod-shm"  # the pod's shm in the guest
    shared_hosts = env.sandboxes[0].shared.host_dir / "c1" / "volumes" / "0"
    assert shared_hosts.read_text() == "127.0.0.1 localhost\n"
    await env.service.start(api.StartRequest(id="c1"))
    agent.emit("c1", b"hello\n")
    agent.exit("c1", 3)
    reply = await asyncio.wait_for(env.service.wait(api.WaitRequest(id="c1")), 5)
    assert reply.exit_status == 3
    assert os.read(reader, 100) == b"hello\n"
    deleted = await env.service.delete(api.DeleteRequest(id="c1"))
    assert deleted.exit_status == 3 and deleted.pid == FAKE_VM_PID
    assert agent.removed == ["c1"]
    assert not (env.sandboxes[0].shared.mounts_dir / "c1").exists()
    os.close(reader)
    # Shutdown is ignored while the sandbox remains.
    await env.service.shutdown(api.ShutdownRequest(id="c1"))
    assert env.shutdowns == []


async def test_exec_events_and_stdin(env: Any) -> None:
    await _run_pod(env)
    await _create(env, "c1")
    await env.service.start(api.StartRequest(id="c1"))
    stdin = env.root / "exec-stdin"
    os.mkfifo(stdin)
    request = api.ExecProcessRequest(id="c1", exec_id="e1", stdin=str(stdin))
    request.spec.value = json.dumps({"args": ["cat"], "cwd": "/"}).encode()
    await env.service.exec(request)
    started = await env.service.start(api.StartRequest(id="c1", exec_id="e1"))
    assert started.pid == FAKE_VM_PID
    writer = os.open(stdin, os.O_WRONLY)
    os.write(writer, b"ping")
    os.close(writer)
    await env.service.close_io(api.CloseIORequest(id="c1", exec_id="e1", stdin=True))
    agent = env.sandboxes[0].agent
    assert bytes(agent.proc("c1", "e1").stdin) == b"ping" and agent.proc("c1", "e1").stdin_closed
    agent.exit("c1", 0, exec_id="e1")
    assert (await env.service.wait(api.WaitRequest(id="c1", exec_id="e1"))).exit_status == 0
    await env.service.delete(api.DeleteRequest(id="c1", exec_id="e1"))
    assert env.publisher.topics()[-3:] == ["TaskExecAdded", "TaskExecStarted", "TaskExit"]


async def test_errors_become_status_codes(env: Any) -> None:
    with pytest.raises(TtrpcError) as exc:
        await env.service.state(api.StateRequest(id="nope"))
    assert exc.value.code == Code.NOT_FOUND
    await _run_pod(env)
    with pytest.raises(TtrpcError) as exc:
        await env.service.state(api.StateRequest(id="nope"))
    assert exc.value.code == Code.NOT_FOUND and "nope" in exc.value.message
    await _create(env, "c1")
    with pytest.raises(TtrpcError) as exc:
        await env.service.delete(api.DeleteRequest(id="c1", exec_id="missing"))
    assert exc.value.code == Code.NOT_FOUND
    await env.service.start(api.StartRequest(id="c1"))
    with pytest.raises(TtrpcError) as exc:
        await env.service.start(api.StartRequest(id="c1"))
    assert exc.value.code == Code.FAILED_PRECONDITION and "running" in exc.value.message
    with pytest.raises(TtrpcError) as exc:
        await env.service.checkpoint(api.CheckpointTaskRequest(id="c1"))
    assert exc.value.code == Code.UNIMPLEMENTED
    bad = api.ExecProcessRequest(id="c1", exec_id="e1")
    bad.spec.value = b"{not json"
    with pytest.raises(TtrpcError) as exc:
        await env.service.exec(bad)
    assert exc.value.code == Code.INVALID_ARGUMENT


async def test_hostile_annotation_is_rejected_before_any_vm(env: Any) -> None:
    bundle = _bundle(env.root, SANDBOX, {"io.kubernetes.cri.container-type": "sandbox",
                                         "io.husk.memory_mib": "4096,share=on"})
    with pytest.raises(TtrpcError) as exc:
        await env.service.create(api.CreateTaskRequest(id=SANDBOX, bundle=str(bundle)))
    assert exc.value.code == Code.INVALID_ARGUMENT and "io.husk.memory_mib" in exc.value.message
    assert env.sandboxes == [] and env.service.pod is None


async def test_stats_are_cgroup_v1_metrics(env: Any) -> None:
    await _run_pod(env)
    await _create(env, "c1")
    reply = await env.service.stats(api.StatsRequest(id="c1"))
    assert reply.stats.type_url == "io.containerd.cgroups.v1.Metrics"
    metrics = metrics_pb2.Metrics.FromString(reply.stats.value)
    assert metrics.cpu.usage.total == 5000 and metrics.memory.usage.usage == 1 << 20
    assert metrics.pids.current == 3


async def test_the_sandbox_stats_are_the_vm_processes_on_the_host(env: Any) -> None:
    await _run_pod(env)
    vm = env.sandboxes[0].vm
    vm.pid = os.getpid()  # stands for QEMU: a live process with CPU time and memory
    reply = await env.service.stats(api.StatsRequest(id=SANDBOX))
    metrics = metrics_pb2.Metrics.FromString(reply.stats.value)
    own = psutil.Process().memory_info().rss
    assert metrics.cpu.usage.total > 0 and metrics.pids.current == 1
    assert own // 2 < metrics.memory.usage.usage < own * 2


async def test_vm_crash_fails_running_processes(env: Any) -> None:
    await _run_pod(env)
    await _create(env, "c1")
    await env.service.start(api.StartRequest(id="c1"))
    env.sandboxes[0].vm.crash()
    reply = await asyncio.wait_for(env.service.wait(api.WaitRequest(id=SANDBOX)), 5)
    assert reply.exit_status == 255
    assert (await env.service.state(api.StateRequest(id="c1"))).status == task_types.STOPPED


async def test_guest_oom_becomes_a_task_oom_event(env: Any) -> None:
    await _run_pod(env)
    await _create(env, "c1")
    agent = env.sandboxes[0].agent
    agent.oom_events.put_nowait("not-a-container")  # from the guest: ignored
    agent.oom_events.put_nowait("c1")
    for _ in range(50):
        if "TaskOOM" in env.publisher.topics():
            break
        await asyncio.sleep(0.01)
    ooms = [e for e in env.publisher.events if type(e).__name__ == "TaskOOM"]
    assert [e.container_id for e in ooms] == ["c1"]


async def test_an_oom_event_flood_is_bounded(env: Any, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile guest sends OOM events as fast as it can: one TaskOOM per container
    per interval reaches containerd, and the log gets a summary, not a line each."""
    from shim.sandbox import pod as pod_module
    monkeypatch.setattr(pod_module, "OOM_FLOOD_EVENTS", 10**9)  # no pacing: count only
    await _run_pod(env)
    await _create(env, "c1")
    agent = env.sandboxes[0].agent
    started = asyncio.get_running_loop().time()
    for i in range(20_000):
        agent.oom_events.put_nowait("c1" if i % 2 else f"ghost{i}")
    for _ in range(500):
        if agent.oom_events.empty():
            break
        await asyncio.sleep(0.01)
    elapsed = asyncio.get_running_loop().time() - started
    assert agent.oom_events.empty()
    assert 1 <= env.publisher.topics().count("TaskOOM") <= 1 + elapsed
    oom_lines = [r for r in caplog.records if "OOM" in r.getMessage()]
    assert 1 <= len(oom_lines) <= 3 + 2 * elapsed
    assert any("suppressed" in r.getMessage() for r in oom_lines)


async def test_an_oom_event_flood_is_paced(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from shim.sandbox import pod as pod_module
    monkeypatch.setattr(pod_module, "OOM_FLOOD_EVENTS", 100)
    await _run_pod(env)
    agent = env.sandboxes[0].agent
    for i in range(1000):
        agent.oom_events.put_nowait(f"ghost{i}")
    await asyncio.sleep(0.5)
    # 100 at full speed, then one per OOM_FLOOD_PAUSE_S (0.01 s): far from all 1000.
    assert 100 < 1000 - agent.oom_events.qsize() < 300


async def test_an_agent_that_stops_answering_ends_the_pod(env: Any,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    import dataclasses
    await _run_pod(env)
    await _create(env, "c1")
    await env.service.start(api.StartRequest(id="c1"))
    pod = env.service.pod
    config = pod.sandbox.config
    pod.sandbox.config = dataclasses.replace(config, agent=dataclasses.replace(
        config.agent, keepalive_interval_s=0.1, keepalive_misses=3))
    for task in pod._watchers:
        if task.get_name() == "agent-keepalive":
            task.cancel()
    pod._watchers.append(asyncio.create_task(pod._keepalive(), name="agent-keepalive"))
    await asyncio.sleep(0.35)
    assert env.sandboxes[0].vm.running, "one missed check is not a dead agent"
    env.sandboxes[0].agent.answering = False
    reply = await asyncio.wait_for(env.service.wait(api.WaitRequest(id="c1")), 5)
    assert reply.exit_status == 255
    assert not env.sandboxes[0].vm.running
    assert "did not answer 3 checks in a row" in caplog.text


async def test_oom_kill_at_exit_is_reported_before_the_exit(env: Any) -> None:
    await _run_pod(env)
    await _create(env, "c1")
    await env.service.start(api.StartRequest(id="c1"))
    agent = env.sandboxes[0].agent
    agent.oom_kills["c1"] = 1  # the guest's cgroup counted an OOM kill...
    agent.exit("c1", 137)      # ...and the init died of SIGKILL before the watcher polled
    await asyncio.wait_for(env.service.wait(api.WaitRequest(id="c1")), 5)
    topics = env.publisher.topics()
    assert topics.count("TaskOOM") == 1
    assert topics.index("TaskOOM") < len(topics) - 1 and topics[-1] == "TaskExit"


async def test_file_uri_stdio(env: Any) -> None:
    await _run_pod(env)
    target = env.root / "logs" / "c1.out"
    await _create(env, "c1", stdout=f"file://{target}")
    await env.service.start(api.StartRequest(id="c1"))
    agent = env.sandboxes[0].agent
    agent.emit("c1", b"to a file\n")
    agent.exit("c1", 0)
    await asyncio.wait_for(env.service.wait(api.WaitRequest(id="c1")), 5)
    assert target.read_text() == "to a file\n"


async def test_unsupported_stdio_scheme_is_refused(env: Any) -> None:
    await _run_pod(env)
    with pytest.raises(TtrpcError) as exc:
        await _create(env, "c1", stdout="tcp://10.0.0.1:1")
    assert exc.value.code == Code.INVALID_ARGUMENT and "tcp" in exc.value.message
    assert not (env.sandboxes[0].shared.mounts_dir / "c1").exists()


async def test_mounts_below_a_volume_keep_their_own_flags(env: Any) -> None:
    """"ro" is not recursive: a writable tmpfs below a read-only volume gets its own bind."""
    from shim.util import mount as mnt
    volume = env.root / "volume"
    (volume / "scratch").mkdir(parents=True)
    (volume / "frozen").mkdir()
    mnt.mount("tmpfs", volume / "scratch", "tmpfs")
    mnt.mount("tmpfs", volume / "frozen", "tmpfs", mnt.MS_RDONLY)
    try:
        await _run_pod(env)
        await _create(env, "c1", mounts=[{"destination": "/data", "type": "bind",
                                          "source": str(volume),
                                          "options": ["rbind", "rprivate", "ro"]}])
        mounts = env.sandboxes[0].agent.proc("c1").spec["mounts"]
        by_destination = {m["destination"]: m for m in mounts}
        assert "ro" in by_destination["/data"]["options"]
        assert by_destination["/data/scratch"]["options"] == ["rbind", "rprivate", "rw"]
        assert by_destination["/data/frozen"]["options"] == ["rbind", "rprivate", "ro"]
        assert by_destination["/data/scratch"]["source"] == "/run/husk/shared/c1/volumes/0-0"
        await env.service.delete(api.DeleteRequest(id="c1"))
    finally:
        for sub in ("scratch", "frozen"):
            fd = os.open(volume / sub, os.O_PATH)
            mnt.detach(fd)
            os.close(fd)


async def test_pod_sysctls_go_to_the_guest(env: Any) -> None:
    bundle = _bundle(env.root, SANDBOX, {"io.kubernetes.cri.container-type": "sandbox"})
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["sysctl"] = {"kernel.shm_rmid_forced": "1", "net/ipv4/ip_forward": "1"}
    (bundle / "config.json").write_text(json.dumps(spec))
    await env.service.create(api.CreateTaskRequest(id=SANDBOX, bundle=str(bundle)))
    assert env.sandboxes[0].pod.sysctl_map == {"kernel.shm_rmid_forced": "1", "net.ipv4.ip_forward": "1"}


@pytest.mark.parametrize("sysctl", [{"../../etc/passwd": "x"}, {"kernel.x": 1}, {"kernel": "1"}])
async def test_malformed_sysctls_are_refused(env: Any, sysctl: dict[str, Any]) -> None:
    bundle = _bundle(env.root, SANDBOX, {"io.kubernetes.cri.container-type": "sandbox"})
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["sysctl"] = sysctl
    (bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(TtrpcError) as exc:
        await env.service.create(api.CreateTaskRequest(id=SANDBOX, bundle=str(bundle)))
    assert exc.value.code == Code.INVALID_ARGUMENT and "sysctl" in exc.value.message
    assert env.sandboxes == [], "a sandbox was made for a refused spec"


async def test_host_network_pod_is_refused_before_anything_exists(env: Any) -> None:
    bundle = _bundle(env.root, SANDBOX, {"io.kubernetes.cri.container-type": "sandbox"})
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [{"type": "ipc"}, {"type": "uts"}]  # as CRI writes hostNetwork
    (bundle / "config.json").write_text(json.dumps(spec))
    with pytest.raises(TtrpcError) as exc:
        await env.service.create(api.CreateTaskRequest(id=SANDBOX, bundle=str(bundle)))
    assert exc.value.code == Code.INVALID_ARGUMENT and "hostNetwork" in exc.value.message
    assert env.sandboxes == [], "a sandbox was made for a host-network pod"


async def test_a_process_that_survives_sigkill_stops_the_vm(env: Any,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    """Seen under TCG: the guest kernel hit a BUG in the dying process, which then never
    exits; without this, StopPodSandbox waits for it forever."""
    await _run_pod(env)
    await _create(env, "c1")
    await env.service.start(api.StartRequest(id="c1"))
    env.sandboxes[0].agent.unkillable.add("c1")
    assert env.service.pod is not None
    env.service.pod.kill_exit_timeout_s = 0.2
    await env.service.kill(api.KillRequest(id="c1", signal=15))  # no watchdog for SIGTERM
    await asyncio.sleep(0.4)
    assert env.sandboxes[0].vm.running
    await env.service.kill(api.KillRequest(id="c1", signal=9))
    reply = await asyncio.wait_for(env.service.wait(api.WaitRequest(id="c1")), 5)
    assert reply.exit_status == 255
    assert not env.sandboxes[0].vm.running
    assert "has not exited 0s after SIGKILL" in caplog.text


async def test_a_task_that_ignores_its_cancellation_does_not_keep_the_pod(
        env: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting the sandbox cancels the pod's tasks; one that swallows the cancellation
    (a `suppress(CancelledError)` around an await) must not stop the VM from going,
    and the log says where it waits."""
    import shim.sandbox.pod as pod_module
    monkeypatch.setattr(pod_module, "TASK_CANCEL_TIMEOUT_S", 0.3)
    await _run_pod(env)
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                pass  # the bug being guarded against

    assert env.service.pod is not None
    task = asyncio.create_task(stubborn(), name="wait-stubborn")
    env.service.pod._monitors.add(task)
    await asyncio.sleep(0)
    await env.service.kill(api.KillRequest(id=SANDBOX, signal=9))
    await asyncio.wait_for(env.service.delete(api.DeleteRequest(id=SANDBOX)), 5)
    assert env.sandboxes[0].stopped
    assert "task wait-stubborn did not end 0s after it was cancelled" in caplog.text
    assert "in stubborn" in caplog.text  # where it waits
    released.set()
    await asyncio.wait_for(task, 1)
