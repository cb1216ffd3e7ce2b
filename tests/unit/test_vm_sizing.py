"""The VM's size from the pod: limits, base, defaults, annotations, maximums."""
from __future__ import annotations

import pytest

from shim.config import HypervisorConfig, SizeOverrides
from shim.sandbox.description import PodResources
from shim.sandbox.sizing import mib_for_bytes, size_vm, vcpus_for_quota

HV = HypervisorConfig(vcpus=1, memory_mib=512, base_vcpus=0, base_memory_mib=256,
                      max_vcpus=8, max_memory_mib=16384)
GIB = 1 << 30


@pytest.mark.parametrize("quota, period, vcpus", [
    (100_000, 100_000, 1), (150_000, 100_000, 2), (1, 100_000, 1), (400_000, 100_000, 4),
    (-1, 100_000, 0), (0, 100_000, 0), (50_000, 0, 0), (250_000, 50_000, 5)])
def test_quota_rounds_up_to_whole_vcpus(quota: int, period: int, vcpus: int) -> None:
    assert vcpus_for_quota(quota, period) == vcpus


def test_memory_rounds_up_to_whole_mib() -> None:
    assert mib_for_bytes(0) == 0 and mib_for_bytes(-1) == 0
    assert mib_for_bytes(1) == 1 and mib_for_bytes(1 << 20) == 1 and mib_for_bytes((1 << 20) + 1) == 2


def test_a_pod_without_limits_gets_the_defaults() -> None:
    size = size_vm(HV, PodResources())
    assert (size.vcpus, size.memory_mib) == (1, 512)
    assert (size.max_vcpus, size.max_memory_mib) == (8, 16384)
    assert "by default" in size.why


def test_a_pod_with_limits_gets_them_plus_the_base() -> None:
    size = size_vm(HV, PodResources(cpu_quota_us=350_000, cpu_period_us=100_000,
                                    memory_bytes=2 * GIB))
    assert (size.vcpus, size.memory_mib) == (4, 2048 + 256)
    with_base = size_vm(HypervisorConfig(base_vcpus=1), PodResources(100_000, 100_000, 0))
    assert with_base.vcpus == 2 and with_base.memory_mib == 512


def test_only_the_dimension_with_a_limit_follows_it() -> None:
    size = size_vm(HV, PodResources(memory_bytes=64 << 20))
    assert (size.vcpus, size.memory_mib) == (1, 64 + 256)


def test_limits_beyond_the_maximum_are_capped() -> None:
    size = size_vm(HV, PodResources(cpu_quota_us=64 * 100_000, cpu_period_us=100_000,
                                    memory_bytes=64 * GIB))
    assert (size.vcpus, size.memory_mib) == (8, 16384)
    assert "capped at the maximum 8" in size.why


def test_annotations_set_the_size_of_a_pod_without_limits() -> None:
    size = size_vm(HV, PodResources(), SizeOverrides(vcpus=3, memory_mib=1024))
    assert (size.vcpus, size.memory_mib) == (3, 1024)


def test_annotations_never_give_a_pod_more_than_its_limits_allow() -> None:
    limits = PodResources(cpu_quota_us=200_000, cpu_period_us=100_000, memory_bytes=GIB)
    bigger = size_vm(HV, limits, SizeOverrides(vcpus=6, memory_mib=8192))
    assert (bigger.vcpus, bigger.memory_mib) == (2, 1024 + 256)
    assert "more than the limits allow" in bigger.why
    smaller = size_vm(HV, limits, SizeOverrides(vcpus=1, memory_mib=512))
    assert (smaller.vcpus, smaller.memory_mib) == (1, 512)

