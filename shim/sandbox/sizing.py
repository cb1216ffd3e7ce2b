"""How big a pod's VM is: vCPUs and memory at boot, and what it may grow to.

A pod with limits gets what they add up to (containerd's sums on the sandbox
spec: ceil(quota / period) vCPUs, the memory limit rounded up to a MiB) plus a
base for the guest's own kernel and agent. A pod without limits gets the
configured defaults. An operator's ``io.husk.vcpus`` / ``io.husk.memory_mib``
annotation replaces either, but never gives a pod with limits more than they
allow. Everything stays within the configured maximums, which the VM boots
with room for (hot-plug grows it there later).
"""
from __future__ import annotations

from dataclasses import dataclass

from shim.config import MIN_MEMORY_MIB, HypervisorConfig, SizeOverrides
from shim.sandbox.description import PodResources

MIB = 1 << 20


@dataclass(frozen=True)
class VmSize:
    vcpus: int
    memory_mib: int
    max_vcpus: int
    max_memory_mib: int
    why: str  # how the size was decided, for the log

    def __str__(self) -> str:
        return (f"{self.vcpus} vCPUs, {self.memory_mib} MiB (up to {self.max_vcpus} vCPUs, "
                f"{self.max_memory_mib} MiB): {self.why}")


def vcpus_for_quota(quota_us: int, period_us: int) -> int:
    """The vCPUs a CFS quota needs (ceil(quota / period)); 0 = no CPU limit."""
    if quota_us <= 0 or period_us <= 0:
        return 0
    return -(-quota_us // period_us)


def mib_for_bytes(size: int) -> int:
    """Bytes rounded up to whole MiB; 0 = no memory limit."""
    return -(-size // MIB) if size > 0 else 0


def size_vm(hv: HypervisorConfig, limits: PodResources,
            overrides: SizeOverrides = SizeOverrides()) -> VmSize:
    cpu_limit = vcpus_for_quota(limits.cpu_quota_us, limits.cpu_period_us)
    memory_limit = mib_for_bytes(limits.memory_bytes)
    vcpus, cpu_why = _pick("vCPUs", hv.vcpus, cpu_limit and cpu_limit + hv.base_vcpus,
                           overrides.vcpus, 1, hv.max_vcpus)
    memory, memory_why = _pick("MiB", hv.memory_mib, memory_limit and memory_limit + hv.base_memory_mib,
                               overrides.memory_mib, MIN_MEMORY_MIB, hv.max_memory_mib)
    return VmSize(vcpus, memory, hv.max_vcpus, hv.max_memory_mib, f"{cpu_why}; {memory_why}")


def _pick(unit: str, default: int, from_limits: int, override: int, least: int,
          most: int) -> tuple[int, str]:
    """One dimension: (value, why). ``from_limits`` is 0 when the pod has no limit."""
    if from_limits:
        value, why = from_limits, f"{from_limits} {unit} from the pod's limits and the base"
        if override and override < from_limits:
            value, why = override, f"{override} {unit} from the annotation (limits allow {from_limits})"
        elif override > from_limits:
            why += f" (the annotation's {override} is more than the limits allow)"
    elif override:
        value, why = override, f"{override} {unit} from the annotation"
    else:
        value, why = default, f"{default} {unit} by default (no limit)"
    if value > most:
        value, why = most, f"{why}, capped at the maximum {most}"
    if value < least:
        value, why = least, f"{why}, raised to the minimum {least}"
    return value, why
