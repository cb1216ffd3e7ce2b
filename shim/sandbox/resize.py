"""A running pod's VM follows its containers' limits (in-place resize).

The VM boots at the size the pod's limits asked for (shim.sandbox.sizing).
Afterwards each container's limits are known from its spec and from every
Update (crictl update, the kubelet's in-place resize); when their sum needs
more than the VM has, vCPUs and memory (DIMMs) are hot-plugged through the
device model and the guest brings them online. When it needs less, the vCPUs
above it go offline in the guest (they stay plugged and idle, and come back
online first on the next grow). Memory is not given back: QEMU 7.2 was seen
to crash unplugging a DIMM the guest had released (TCG, vhost-user-fs), so a
shrink only logs what the VM keeps. The VM never goes below its boot size.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from shim import errors
from shim.config import HypervisorConfig
from shim.sandbox.sizing import VmSize, mib_for_bytes
from shim.vm.devices import DeviceError, Devices

log = logging.getLogger(__name__)

# Linux onlines hot-plugged memory in blocks of 128 MiB (x86-64): a DIMM is a
# whole number of them, or its tail stays unused.
MEMORY_BLOCK_MIB = 128
MILLI = 1000


class GuestOnline(Protocol):
    """What the resize needs from the agent (AgentClient.online_cpu_mem)."""

    async def online_cpu_mem(self, vcpus: int, min_memory_bytes: int) -> tuple[int, int]: ...


@dataclass(frozen=True)
class Limits:
    """One container's limits; 0 = none."""

    millicpus: int = 0
    memory_bytes: int = 0

    @classmethod
    def from_resources(cls, resources: Mapping[str, Any] | None) -> Limits:
        """From an OCI LinuxResources object (a spec's linux.resources, an Update's)."""
        if not isinstance(resources, Mapping):
            return cls()
        cpu, memory = resources.get("cpu"), resources.get("memory")
        cpu = cpu if isinstance(cpu, Mapping) else {}
        memory = memory if isinstance(memory, Mapping) else {}
        quota, period = _positive(cpu.get("quota")), _positive(cpu.get("period"))
        millicpus = -(-quota * MILLI // period) if quota and period else 0
        return cls(millicpus, _positive(memory.get("limit")))


def _positive(value: Any) -> int:
    """A limit's value, or 0 for none (-1, 0, absent, not an integer, absurd)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 62:
        return value
    return 0


@dataclass
class VmResizer:
    hv: HypervisorConfig
    boot: VmSize
    limits: dict[str, Limits] = field(default_factory=dict)  # by live container id
    present_vcpus: int = 0  # plugged at boot (online or not); 0 = the boot count
    vcpus_added: list[str] = field(default_factory=list)     # device ids, oldest first
    online_vcpus: int = 0  # in the guest; 0 = the boot count
    dimms_added: list[tuple[str, int]] = field(default_factory=list)  # (device id, MiB)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.online_vcpus = self.online_vcpus or self.boot.vcpus
        self.present_vcpus = self.present_vcpus or self.boot.vcpus

    @property
    def vcpus(self) -> int:
        """Present (plugged), online or not."""
        return self.present_vcpus + len(self.vcpus_added)

    @property
    def memory_mib(self) -> int:
        return self.boot.memory_mib + sum(size for _, size in self.dimms_added)

    def target(self) -> tuple[int, int]:
        """(vCPUs, MiB) the containers' limits need, never less than the boot size."""
        millicpus = sum(limit.millicpus for limit in self.limits.values())
        memory_mib = mib_for_bytes(sum(limit.memory_bytes for limit in self.limits.values()))
        vcpus = -(-millicpus // MILLI) + self.hv.base_vcpus if millicpus else 0
        memory = memory_mib + self.hv.base_memory_mib if memory_mib else 0
        return (min(max(self.boot.vcpus, vcpus), self.boot.max_vcpus),
                min(max(self.boot.memory_mib, memory), self.boot.max_memory_mib))

    def _expected_memory_bytes(self) -> int:
        """What the guest should show online once it has every DIMM: its boot memory in
        whole blocks (less one, for the hole q35 may cut below 4 GiB) and the DIMMs."""
        if not self.dimms_added:
            return 0
        boot = max(0, self.boot.memory_mib // MEMORY_BLOCK_MIB - 1) * MEMORY_BLOCK_MIB
        return (boot + sum(size for _, size in self.dimms_added)) << 20

    def forget(self, container_id: str) -> None:
        """A removed container (the VM keeps its size until the next resize)."""
        self.limits.pop(container_id, None)

    async def grow(self, devices: Devices, guest: GuestOnline) -> None:
        """Hot-plug what the target needs beyond the VM's size, and bring it online (vCPUs
        offlined by an earlier shrink come back first).

        :raise errors.ResourceExhaustedError: QEMU could not add it (no free slot...);
            what was added stays, online.
        """
        async with self._lock:
            vcpus, memory = self.target()
            if vcpus <= self.online_vcpus and memory <= self.memory_mib:
                return
            failure = None
            try:
                while self.vcpus < vcpus:
                    self.vcpus_added.append(await devices.add_vcpu())
                if memory > self.memory_mib:
                    room = self.boot.max_memory_mib - self.memory_mib
                    size = min(-(-(memory - self.memory_mib) // MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB,
                               room // MEMORY_BLOCK_MIB * MEMORY_BLOCK_MIB)
                    if size > 0:
                        self.dimms_added.append((await devices.add_memory(size), size))
            except DeviceError as exc:
                failure = exc
            online = min(vcpus, self.vcpus)
            guest_cpus, guest_bytes = await guest.online_cpu_mem(online, self._expected_memory_bytes())
            self.online_vcpus = online
            log.info("VM grown to %d vCPUs online, %d MiB (wanted %d, %d MiB); the guest reports "
                     "%d online, %d MiB", online, self.memory_mib, vcpus, memory,
                     guest_cpus, guest_bytes >> 20)
            if failure is not None:
                raise errors.ResourceExhaustedError(
                    f"the VM could not grow to {vcpus} vCPUs and {memory} MiB: {failure}")

    async def shrink(self, guest: GuestOnline) -> None:
        """Take what is no longer needed away from the guest; never raises (what stays is
        logged). vCPUs above the target go offline (they stay plugged, idle, ready for
        the next grow); memory stays: a DIMM is not unplugged (see the README)."""
        async with self._lock:
            vcpus, memory = self.target()
            if self.online_vcpus > vcpus:
                try:
                    await guest.online_cpu_mem(vcpus, 0)
                    self.online_vcpus = vcpus
                except errors.HuskError as exc:
                    log.warning("VM keeps %d vCPUs online (%d wanted): %s", self.online_vcpus,
                                vcpus, exc)
            if self.memory_mib > memory:
                log.info("VM keeps %d MiB (%d wanted): hot-added memory is not unplugged",
                         self.memory_mib, memory)
