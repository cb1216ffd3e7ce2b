"""Pod resources through the CRI: the VM is sized from the pod's limits."""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess

import psutil
import pytest
from cri_api.v1 import api_pb2 as api

from shim.cgroups import host
from shim.util.procstats import memfd_bytes, mergeable_rss_bytes, private_rss_bytes
from tests.cri.cri import CriClient, CriError
from tests.cri.harness import CRI_NAMESPACE, Containerd
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(600)]

HANDLER = "husk"
MIB = 1 << 20
# The guest's own share, on top of the pod's memory limit (husk.toml's default).
BASE_MEMORY_MIB = 256
# What the guest kernel keeps for itself (its image, page tables) and MemTotal leaves
# out: ~56 MiB of this guest's.
KERNEL_MIB = 96


def _guest_ram_bytes(pod_id: str) -> int:
    """What the memfds holding the pod's shared guest RAM have allocated (QEMU holds them
    open), and QEMU's private guest RAM (split guest RAM: the mappings marked for KSM)."""
    pid = _qemu(pod_id).pid
    return memfd_bytes(pid, set()) + mergeable_rss_bytes(pid)


def _qemu(pod_id: str) -> psutil.Process:
    qemu = [p for p in psutil.process_iter(["cmdline"])
            if "qemu-system" in " ".join(p.info["cmdline"] or []) and pod_id in " ".join(p.info["cmdline"])]
    assert len(qemu) == 1, qemu
    return qemu[0]


def _guest_size(cri: CriClient, cid: str) -> tuple[int, int]:
    """(online CPUs, MemTotal in MiB) as the container sees the guest."""
    out = cri.exec_sync(cid, ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"], timeout=30).out
    cpus, meminfo = out.splitlines()[:2]
    match = re.search(r"(\d+) kB", meminfo)
    assert match, meminfo
    return int(cpus), int(match.group(1)) // 1024


def test_a_pod_with_limits_gets_a_vm_of_their_size(each_cri: CriClient) -> None:
    cri = each_cri  # containerd 1.6 and 2.x: pod resources arrive differently in each
    limits = api.LinuxContainerResources(cpu_period=100_000, cpu_quota=150_000,
                                         memory_limit_in_bytes=384 * MIB)
    pod = cri.run_pod("sized", handler=HANDLER, resources=limits)
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    cpus, memory_mib = _guest_size(cri, cid)
    assert cpus == 2, "ceil(150000 / 100000) vCPUs"
    assert 384 + BASE_MEMORY_MIB - KERNEL_MIB <= memory_mib <= 384 + BASE_MEMORY_MIB, memory_mib
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


def test_a_pod_without_limits_gets_the_default_size(cri: CriClient) -> None:
    pod = cri.run_pod("unsized", handler=HANDLER)
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    cpus, memory_mib = _guest_size(cri, cid)
    assert cpus == 1
    assert 512 - KERNEL_MIB <= memory_mib <= 512, memory_mib
    # A container whose limits need more than the VM has grows it before it starts.
    limited = api.LinuxContainerResources(cpu_period=100_000, cpu_quota=250_000)
    big = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], resources=limited)
    assert _guest_size(cri, big)[0] == 3, "ceil(2.5) vCPUs online before it started"
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


def _limit_in_guest(cri: CriClient, cid: str) -> int:
    """The container's memory limit in the guest's cgroup2 tree (its own cgroup, by
    /proc/self/cgroup, whether or not it has a cgroup namespace)."""
    result = cri.exec_sync(cid, ["sh", "-c", "cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)"
                                             "/memory.max; cat /proc/self/cgroup"])
    assert result.out.split(), result.err
    return int(result.out.split()[0])


def test_update_grows_the_vm_and_lowering_offlines_what_it_added(each_cri: CriClient) -> None:
    cri = each_cri  # containerd 1.6 and 2.x: pod resources arrive differently in each
    small = api.LinuxContainerResources(cpu_period=100_000, cpu_quota=100_000,
                                        memory_limit_in_bytes=256 * MIB)
    pod = cri.run_pod("resized", handler=HANDLER, resources=small)
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"], resources=small)
    boot_cpus, boot_mib = _guest_size(cri, cid)
    assert boot_cpus == 1

    big = api.LinuxContainerResources(cpu_period=100_000, cpu_quota=300_000,
                                      memory_limit_in_bytes=1024 * MIB)
    cri.update_container_resources(cid, big, timeout=120)
    cpus, memory_mib = _guest_size(cri, cid)
    assert cpus == 3, "ceil(300000 / 100000) vCPUs, hot-plugged and online"
    assert memory_mib >= 1024 + BASE_MEMORY_MIB - KERNEL_MIB, (boot_mib, memory_mib)
    assert _limit_in_guest(cri, cid) == 1024 * MIB
    # The container can use what it was given: dd fills a 600 MiB buffer, more than the
    # whole VM had at boot.
    fill = cri.exec_sync(cid, ["dd", "if=/dev/zero", "of=/dev/null", "bs=600M", "count=1"],
                         timeout=120)
    assert fill.exit_code == 0 and "1+0 records out" in fill.err, fill.out + fill.err

    cri.update_container_resources(cid, small, timeout=120)
    cpus, kept_mib = _guest_size(cri, cid)
    assert cpus == 1, "the hot-plugged vCPUs go offline"
    assert _limit_in_guest(cri, cid) == 256 * MIB
    assert kept_mib == memory_mib, "hot-added memory stays (and the shim log says so)"

    # Growing again brings the offline vCPUs back.
    cri.update_container_resources(cid, big, timeout=120)
    assert _guest_size(cri, cid)[0] == 3
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


def _sandbox_task_memory(containerd: Containerd, pod_id: str) -> int:
    """The sandbox task's memory usage in its Metrics (the shim's Stats), via ctr."""
    out = subprocess.run([containerd.tool("ctr"), "--address", str(containerd.address), "-n",
                          CRI_NAMESPACE, "task", "metrics", "--format", "json", pod_id],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return int(json.loads(out)["memory"]["usage"]["usage"])


def test_pod_stats_are_the_vms_and_rise_under_load(containerd: Containerd, cri: CriClient) -> None:
    pod = cri.run_pod("statsp", handler=HANDLER)
    cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "600"])
    before = cri.pod_stats(pod.id).linux
    # The VM's: QEMU and virtiofsd in the pod cgroup hold tens of MiB (~60 here, idle),
    # the busybox container's own cgroup in the guest well under one.
    assert before.memory.working_set_bytes.value > 32 * MIB, "QEMU's memory, at least"
    # The guest's RAM is the pod's, also when the shim wrote it (a VM from a template).
    guest_ram = _guest_ram_bytes(pod.id)
    assert guest_ram > 32 * MIB
    assert before.memory.working_set_bytes.value > guest_ram, \
        f"the pod cgroup does not hold the guest's {guest_ram >> 20} MiB of RAM"
    # The sandbox task's own figure (QEMU's and virtiofsd's) has the guest RAM once,
    # also the pages of it that no process has touched since the shim wrote them.
    task_memory = _sandbox_task_memory(containerd, pod.id)
    qemu = _qemu(pod.id).pid  # its heap, TCG's buffers, libraries:
    qemu_own = private_rss_bytes(qemu) - mergeable_rss_bytes(qemu)
    assert guest_ram + 0.9 * qemu_own < task_memory < guest_ram + qemu_own + 64 * MIB, \
        (task_memory >> 20, guest_ram >> 20, qemu_own >> 20)
    cpu_before = before.cpu.usage_core_nano_seconds.value
    assert cpu_before > 0
    container_cpu_before = cri.container_stats(cid).cpu.usage_core_nano_seconds.value
    # Three seconds of a busy loop in the container: the VM burns host CPU for it, and
    # the container's own figure counts the loop (its share of one vCPU).
    cri.exec_sync(cid, ["timeout", "3", "sh", "-c", "while :; do :; done"], timeout=60)
    after = cri.pod_stats(pod.id).linux
    assert after.cpu.usage_core_nano_seconds.value - cpu_before > 1_000_000_000
    container = cri.container_stats(cid)
    busy_ns = container.cpu.usage_core_nano_seconds.value - container_cpu_before
    assert 1_500_000_000 < busy_ns < 4_000_000_000, busy_ns
    assert 0 < container.memory.working_set_bytes.value < before.memory.working_set_bytes.value, \
        "the container's own figures come from its cgroup in the guest"
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)


@pytest.mark.skipif(os.environ.get("HUSK_TEST_TEMPLATES") == "off", reason="templates are off")
def test_a_pod_whose_limit_cannot_hold_its_guest_ram_is_refused_clearly(cri: CriClient) -> None:
    """A VM from a template has its guest RAM charged to the pod's cgroup from the start:
    a pod cgroup limited below that is refused with the reason, not OOM-killed."""
    memory = host._memory_hierarchy()
    if memory is None or not cri.cgroup_root:
        pytest.skip("no memory cgroup to limit")
    parent = f"{cri.cgroup_root}/podtight{secrets.token_hex(4)}"
    pod_dir = memory[0] / parent.lstrip("/")
    pod_dir.mkdir(parents=True)
    try:
        limit = "memory.max" if memory[0] == host.CGROUP_ROOT else "memory.limit_in_bytes"
        (pod_dir / limit).write_text(str(32 * MIB))
        with pytest.raises(CriError) as refused:
            cri.run_pod("tight", handler=HANDLER, cgroup_parent=parent)
        assert "memory limit leaves" in refused.value.details, refused.value
        assert "overhead.podFixed.memory" in refused.value.details, refused.value
    finally:
        pod_dir.rmdir()
