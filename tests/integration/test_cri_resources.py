"""Pod resources through the CRI: the VM is sized from the pod's limits."""
from __future__ import annotations

import re

import pytest
from cri_api.v1 import api_pb2 as api

from tests.cri.cri import CriClient
from tests.cri.images import BUSYBOX_REF

pytestmark = [pytest.mark.cri, pytest.mark.timeout(600)]

HANDLER = "husk"
MIB = 1 << 20
# The guest's own share, on top of the pod's memory limit (husk.toml's default).
BASE_MEMORY_MIB = 256
# What the guest kernel keeps for itself (its image, page tables) and MemTotal leaves
# out: ~56 MiB of this guest's.
KERNEL_MIB = 96


def _guest_size(cri: CriClient, cid: str) -> tuple[int, int]:
    """(online CPUs, MemTotal in MiB) as the container sees the guest."""
    out = cri.exec_sync(cid, ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"], timeout=30).out
    cpus, meminfo = out.splitlines()[:2]
    match = re.search(r"(\d+) kB", meminfo)
    assert match, meminfo
    return int(cpus), int(match.group(1)) // 1024


def test_a_pod_with_limits_gets_a_vm_of_their_size(cri: CriClient) -> None:
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
    cri.stop_pod(pod.id)
    cri.remove_pod(pod.id)
