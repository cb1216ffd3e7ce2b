"""husk through the CRI: a private containerd runs pods with runtime handler `husk`.

Every pod is a real VM. The per-test fixture fails a test that leaves a pod,
container, shim process, mount or cgroup task behind; here we also check that
no QEMU/virtiofsd process and no sandbox run directory survive. Each test runs
against containerd 1.6 and, where its build is present, containerd 2.x.
"""
from __future__ import annotations

import json
import subprocess
import threading

import pytest

from shim.task.service import SHIM_VERSION
from tests.conftest import HUSK_CRI_STATE as HUSK_STATE
from tests.conftest import our_processes
from tests.cri.cri import CriClient, CriError, wait_for
from tests.cri.fixtures import leak_checked
from tests.cri.harness import Containerd
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(600)]
INSPECT_TIMEOUT_S = 30.0
KILLED_SHIM_EXIT_TIMEOUT_S = 30.0


@pytest.fixture
def cri(each_cri: CriClient) -> CriClient:
    """Here `cri` is each containerd's in turn (tests.cri.fixtures.each_cri)."""
    return each_cri


def _assert_no_vm_left() -> None:
    assert our_processes(str(HUSK_STATE)) == [], "QEMU or virtiofsd still running"
    sandboxes = HUSK_STATE / "sb"
    assert not sandboxes.exists() or list(sandboxes.iterdir()) == [], "sandbox dirs left"


def test_pod_with_two_containers(cri: CriClient) -> None:
    pod = cri.run_pod("husk-two", handler="husk")
    # One short-lived container: output reaches the CRI log file, exit code reported.
    short = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", "echo hello; echo oops >&2; exit 3"])
    status = cri.wait_container_exit(short, timeout=60)
    assert status.exit_code == 3
    log = cri.read_log(short)
    assert log.stdout == "hello\n" and log.stderr == "oops\n"
    # A second, long-running container in the same pod (same VM).
    graceful = cri.run_container(pod, BUSYBOX_REF, [
        "sh", "-c", "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 1; done"])
    stubborn = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    result = cri.exec_sync(graceful, ["sh", "-c", "echo $((6*7)); exit 3"], timeout=60)
    assert (result.exit_code, result.out) == (3, "42\n")
    assert cri.exec_sync(stubborn, ["cat", "/etc/hostname"]).out.strip() == "husk-two"
    # Containers of a pod share its IPC and UTS namespaces, as with runc.
    ns = "readlink /proc/self/ns/ipc /proc/self/ns/uts; hostname"
    assert cri.exec_sync(graceful, ["sh", "-c", ns]).out == \
        cri.exec_sync(stubborn, ["sh", "-c", ns]).out
    assert cri.exec_sync(stubborn, ["hostname"]).out == "husk-two\n"
    # ...and its /dev/shm.
    cri.exec_sync(graceful, ["sh", "-c", "echo shared > /dev/shm/note"])
    assert cri.exec_sync(stubborn, ["cat", "/dev/shm/note"]).out == "shared\n"
    assert cri.container_status(stubborn).state == 1  # CONTAINER_RUNNING
    # Stats come from the container's cgroup inside the guest, as cgroups v1 Metrics.
    stats = cri.container_stats(stubborn)
    assert stats.memory.working_set_bytes.value > 0
    assert stats.cpu.usage_core_nano_seconds.value > 0
    # Graceful stop: SIGTERM is handled.
    cri.stop_container(graceful, timeout=20)
    assert cri.container_status(graceful).exit_code == 0
    assert "bye" in cri.read_log(graceful).stdout
    # PID 1 `sleep` ignores SIGTERM: SIGKILL after the grace period.
    cri.stop_container(stubborn, timeout=2)
    assert cri.container_status(stubborn).exit_code == 137
    for cid in (short, graceful, stubborn):
        cri.remove_container(cid)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    _assert_no_vm_left()


def test_two_pods_at_once(cri: CriClient) -> None:
    results: dict[str, str] = {}
    failures: list[BaseException] = []

    def one(name: str) -> None:
        try:
            pod = cri.run_pod(name, handler="husk")
            cid = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", "echo from $(hostname)"])
            cri.wait_container_exit(cid, timeout=60)
            results[name] = cri.read_log(cid).stdout
            cri.remove_container(cid)
            cri.stop_pod(pod.id)
            cri.remove_pod(pod.id)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("husk-a", "husk-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    assert results == {"husk-a": "from husk-a\n", "husk-b": "from husk-b\n"}
    _assert_no_vm_left()


def test_hostile_annotation_is_refused(cri: CriClient) -> None:
    with pytest.raises(CriError) as exc:
        cri.run_pod("husk-bad", handler="husk", annotations={"io.husk.memory_mib": "64,share=on"})
    assert "io.husk.memory_mib" in str(exc.value)
    cri.remove_all_pods()
    _assert_no_vm_left()


def test_killed_shim_leaves_nothing_behind(each_containerd: Containerd, cri: CriClient) -> None:
    import psutil

    pod = cri.run_pod("husk-kill", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    daemons = [p for p in psutil.process_iter(["cmdline"])
               if "serve" in (p.info["cmdline"] or []) and pod.id in (p.info["cmdline"] or [])]
    assert len(daemons) == 1, daemons
    daemons[0].kill()  # SIGKILL: no chance to clean up; QEMU dies with it (PDEATHSIG)
    daemons[0].wait(10)
    # containerd notices the dead shim and runs `containerd-shim-husk-v2 delete`, which
    # also takes husk's tc filter, qdisc and port-forward rule out of the pod's netns.
    # The container is reported gone: by 1.6 as soon as its Wait meets the closed
    # connection, which can be before that delete has run (a stop then would tear the
    # network down first; the filters would go with the netns, but not by husk's hand);
    # 2.x's CRI retries its exit handling (its first task Delete meets the closed
    # connection) a couple of seconds later, and until then refuses RemovePodSandbox
    # ("container is still running"), as it would with any runtime's dead shim.
    assert cri.wait_container_exit(cid, timeout=KILLED_SHIM_EXIT_TIMEOUT_S).exit_code == 255
    wait_for("the dead shim's delete", lambda: not (HUSK_STATE / "sb" / pod.id).exists() or None,
             timeout=KILLED_SHIM_EXIT_TIMEOUT_S)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    _assert_no_vm_left()
    (eth0, *_) = each_containerd.cni_del_records(pod.id)
    assert eth0["netns_present"] and eth0["errors"] == [], eth0
    assert eth0["ingress_filters"] == [], "husk's filter outlived its killed shim"
    assert "ingress" not in {q.get("kind") for q in eth0["qdiscs"]}
    assert not [r for r in eth0["nat_rules"] if "husk" in r], eth0["nat_rules"]


def test_vm_killed_under_a_running_pod(cri: CriClient) -> None:
    import psutil

    pod = cri.run_pod("husk-vmkill", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    qemu = [p for p in psutil.process_iter(["cmdline"])
            if "qemu-system" in " ".join(p.info["cmdline"] or [])
            and f"/sb/{pod.id}/" in " ".join(p.info["cmdline"] or [])]
    assert len(qemu) == 1, qemu
    qemu[0].kill()
    # The container is reported gone (255), not left "running" forever.
    status = cri.wait_container_exit(cid, timeout=30)
    assert status.exit_code == 255
    cri.remove_container(cid)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    _assert_no_vm_left()


def test_oom_kill_is_reported(cri: CriClient) -> None:
    from cri_api.v1 import api_pb2 as api

    from tests.cri.cri import wait_for

    pod = cri.run_pod("husk-oom", handler="husk")
    hog = cri.run_container(pod, BUSYBOX_REF, ["dd", "if=/dev/zero", "of=/dev/null", "bs=96M",
                                               "count=1"],
                            resources=api.LinuxContainerResources(memory_limit_in_bytes=32 << 20))
    status = cri.wait_container_exit(hog, timeout=60)
    assert status.exit_code == 137
    # The guest's OOM kill reaches containerd as a TaskOOM event.
    wait_for("OOMKilled reason", lambda: cri.container_status(hog).reason == "OOMKilled" or None,
             timeout=15)
    cri.remove_container(hog)
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
    _assert_no_vm_left()


def test_containerd2_introspects_husk(containerd2: Containerd, request: pytest.FixtureRequest) -> None:
    """containerd 2.x asks the shim `-info` (the CRI plugin for each handler as it starts, the
    task manager before a runtime's first task) and reads a RuntimeInfo from its stdout."""
    config = containerd2.options.husk_config
    assert config is not None
    inspect = subprocess.run(
        [containerd2.tool("ctr"), "--address", containerd2.address, "plugins", "inspect-runtime",
         "--runtime", "io.containerd.husk.v2", "--runtime-config-path", str(config)],
        capture_output=True, text=True, timeout=INSPECT_TIMEOUT_S, check=False)
    assert inspect.returncode == 0, inspect.stderr
    info = json.loads(inspect.stdout)
    assert info["Name"] == "io.containerd.husk.v2"
    assert info["Version"]["Version"] == SHIM_VERSION
    assert info["Options"]["config_path"] == str(config), info  # the options it was given
    with leak_checked(containerd2, request) as cri:
        pod = cri.run_pod("husk-info", handler="husk")
        cid = cri.run_container(pod, BUSYBOX_REF, ["true"])
        assert cri.wait_container_exit(cid, timeout=60).exit_code == 0
        cri.remove_container(cid)
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)
    log = containerd2.log_path.read_text(errors="replace")
    assert "failed to load runtime info" not in log


def test_rootfs_submounts_outlive_their_container(containerd: Containerd,
                                                  request: pytest.FixtureRequest) -> None:
    """Each container's rootfs (a host mount in the shared directory) is a virtio-fs
    submount in the guest, and the agent mounts it in its own namespace before crun
    crosses it in the container's: a container killed while its first reads are in
    flight then never tears down a superblock under them (Linux 6.1 frees inodes those
    reads still use, and the guest's virtio-fs dies). Released with the container."""
    with leak_checked(containerd, request) as cri:
        pod = cri.run_pod("husk-submounts", handler="husk", privileged=True, host_pid=True)
        inspector = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], privileged=True,
                                      host_pid=True)

        def agent_mounts() -> str:
            return cri.exec_sync(inspector, ["nsenter", "-t", "1", "-m", "--",
                                             "cat", "/proc/self/mountinfo"]).out

        # Killed the moment it starts, five times over: the guest stays whole.
        for _ in range(5):
            victim = cri.create_container(pod, BUSYBOX_REF, ["sleep", "600"])
            cri.start_container(victim)
            cri.stop_container(victim, timeout=0)
            cri.remove_container(victim)
        held = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
        assert f"/{held}/rootfs " in agent_mounts()
        cri.stop_container(held, timeout=0)
        cri.remove_container(held)
        wait_for("the agent to let the rootfs go", lambda: True if f"/{held}/rootfs "
                 not in agent_mounts() else None, timeout=10)
        assert "/rootfs " in agent_mounts()  # the inspector's, still held
        kernel_log = cri.exec_sync(inspector, ["dmesg"]).out
        assert "Busy inodes" not in kernel_log and "general protection" not in kernel_log
        assert cri.exec_sync(inspector, ["cat", "/etc/hostname"]).out == "husk-submounts\n"
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)
