"""Faults and repetition through the CRI: nothing lost, nothing left.

kill -9 of the VM's helpers and of containerd with a running container, then
pods and containers over and over (HUSK_LIFECYCLES times; `make soak` runs 100)
and ten pods at once. The `cri` fixture fails a test that leaves a pod, shim,
socket, mount or cgroup task; here we also check QEMU/virtiofsd processes,
sandbox run dirs and the shim's open file descriptors.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.conftest import HUSK_CRI_STATE as HUSK_STATE
from tests.conftest import our_processes
from tests.cri.cri import CriClient, Pod
from tests.cri.harness import Containerd
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(1800)]

LIFECYCLES = int(os.environ.get("HUSK_LIFECYCLES", "10"))
PODS_AT_ONCE = 10
# The exit of a container whose VM died must reach the CRI this fast (plus the
# CRI client's polling).
EXIT_REPORTED_WITHIN_S = 2.0
RUN_POD_TIMEOUT_S = 600.0


def _assert_no_vm_left() -> None:
    assert our_processes(str(HUSK_STATE)) == [], "QEMU or virtiofsd still running"
    sandboxes = HUSK_STATE / "sb"
    assert not sandboxes.exists() or list(sandboxes.iterdir()) == [], "sandbox dirs left"


def _helpers(pod: Pod, program: str) -> list[psutil.Process]:
    """The pod's QEMU, or its virtiofsd (the parent and its sandboxed worker)."""
    found = [p for p in psutil.process_iter(["cmdline"])
             if program in " ".join((p.info["cmdline"] or [])[:1])
             and f"/sb/{pod.id}/" in " ".join(p.info["cmdline"] or [])]
    assert found, f"no {program} for {pod.id}"
    return found


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        proc.kill()


def _shim(pod: Pod) -> psutil.Process:
    found = [p for p in psutil.process_iter(["cmdline"])
             if "serve" in (p.info["cmdline"] or []) and pod.id in (p.info["cmdline"] or [])]
    assert len(found) == 1, found
    return found[0]


def _remove(cri: CriClient, pod: Pod) -> None:
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


def test_virtiofsd_killed_under_a_running_pod(cri: CriClient) -> None:
    pod = cri.run_pod("fault-fs", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    _kill_all(_helpers(pod, "virtiofsd"))
    killed = time.monotonic()
    status = cri.wait_container_exit(cid, timeout=30)
    assert time.monotonic() - killed < EXIT_REPORTED_WITHIN_S + 1.0
    assert status.exit_code == 255
    # The cause reaches the log once the VM's watcher has stopped QEMU and drained the
    # guest's output, which may be after the container's exit was reported.
    log = Path(f"/var/log/husk/{pod.id}.log")
    for _ in range(50):
        if "virtiofsd exited" in log.read_text(errors="replace"):
            break
        time.sleep(0.1)
    assert "virtiofsd exited" in log.read_text(errors="replace")
    _remove(cri, pod)
    _assert_no_vm_left()


def test_qemu_killed_is_reported_at_once(cri: CriClient) -> None:
    pod = cri.run_pod("fault-vm", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    qemu = _helpers(pod, "qemu-system")
    assert len(qemu) == 1, qemu
    _kill_all(qemu)
    killed = time.monotonic()
    assert cri.wait_container_exit(cid, timeout=30).exit_code == 255
    assert time.monotonic() - killed < EXIT_REPORTED_WITHIN_S + 1.0
    _remove(cri, pod)
    _assert_no_vm_left()


def test_a_restarted_containerd_still_controls_the_pod(each_cri: CriClient,
                                                       each_containerd: Containerd) -> None:
    # containerd 2.x reconnects from the bootstrap.json it wrote, 1.6 from the shim's address file.
    cri, containerd = each_cri, each_containerd
    pod = cri.run_pod("fault-containerd", handler="husk")
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    shim = _shim(pod)
    containerd.restart()  # SIGKILL: containerd dies, its shims do not
    assert shim.is_running(), "the shim died with containerd"
    client = containerd.cri
    assert client.exec_sync(cid, ["echo", "back"]).out == "back\n"
    assert client.container_status(cid).state == 1  # CONTAINER_RUNNING
    client.stop_container(cid, timeout=1)
    assert client.container_status(cid).exit_code == 137
    _remove(client, pod)
    _assert_no_vm_left()


def test_pod_lifecycles_in_a_row(cri: CriClient) -> None:
    for i in range(LIFECYCLES):
        pod = cri.run_pod(f"cycle-{i}", handler="husk", timeout=RUN_POD_TIMEOUT_S)
        cid = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", f"echo round {i}"])
        assert cri.wait_container_exit(cid, timeout=60).exit_code == 0
        assert cri.read_log(cid).stdout == f"round {i}\n"
        _remove(cri, pod)
        _assert_no_vm_left()


def test_container_lifecycles_leave_the_shim_as_it_was(cri: CriClient) -> None:
    pod = cri.run_pod("cycle-containers", handler="husk")
    shim = _shim(pod)
    keeper = cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"])

    def one_round(i: int) -> None:
        cid = cri.run_container(pod, BUSYBOX_REF, ["sh", "-c", f"echo {i}; echo err >&2"])
        assert cri.wait_container_exit(cid, timeout=60).exit_code == 0
        assert cri.exec_sync(keeper, ["echo", str(i)]).out == f"{i}\n"
        cri.remove_container(cid)

    one_round(0)  # first use opens what stays open for the pod's life
    fds, threads = shim.num_fds(), shim.num_threads()
    for i in range(1, LIFECYCLES + 1):
        one_round(i)
    time.sleep(1.0)
    assert shim.num_fds() == fds, f"the shim leaked fds: {fds} → {shim.num_fds()}"
    assert shim.num_threads() <= threads + 2
    _remove(cri, pod)
    _assert_no_vm_left()


@pytest.mark.whole_machine
def test_ten_pods_at_once(cri: CriClient) -> None:
    def bring_up(i: int) -> tuple[Pod, str]:
        pod = cri.run_pod(f"many-{i}", handler="husk", timeout=RUN_POD_TIMEOUT_S)
        cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], timeout=RUN_POD_TIMEOUT_S)
        return pod, cid

    with ThreadPoolExecutor(PODS_AT_ONCE) as pool:
        pods = list(pool.map(bring_up, range(PODS_AT_ONCE)))
    assert len({pod.id for pod, _ in pods}) == PODS_AT_ONCE
    for i, (pod, cid) in enumerate(pods):
        assert cri.exec_sync(cid, ["hostname"]).out == f"many-{i}\n"
    with ThreadPoolExecutor(PODS_AT_ONCE) as pool:
        list(pool.map(lambda p: _remove(cri, p[0]), pods))
    _assert_no_vm_left()
