"""vCPUs and memory the host hot-plugs, brought online (or offline) through sysfs.

QEMU's ACPI hot-plug makes a new vCPU or DIMM *present*; the guest kernel adds
it asynchronously, and a CPU stays offline until someone writes its ``online``
file (no udev in this guest). Memory blocks are onlined movable, so the
kernel keeps its own allocations out of them and can give a DIMM back on unplug.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from agent.errors import DeadlineError, GuestError, InvalidArgumentError

log = logging.getLogger(__name__)

CPU_DIR = re.compile(r"cpu(\d+)")
MEMORY_DIR = re.compile(r"memory(\d+)")
# ACPI hot-plug reaches the guest kernel within a second or two, more under TCG.
SETTLE_TIMEOUT_S = 20.0
POLL_S = 0.05
MAX_VCPUS = 1024


@dataclass(frozen=True)
class GuestResources:
    online_vcpus: int
    memory_bytes: int  # online memory


class Hotplug:
    def __init__(self, sysfs: Path = Path("/sys")) -> None:
        self.cpu_root = sysfs / "devices" / "system" / "cpu"
        self.memory_root = sysfs / "devices" / "system" / "memory"

    def _cpus(self) -> dict[int, Path]:
        """Present CPUs by number; cpu0 has no online file (it never goes offline)."""
        found = {}
        for entry in self.cpu_root.iterdir():
            match = CPU_DIR.fullmatch(entry.name)
            if match:
                found[int(match.group(1))] = entry
        return dict(sorted(found.items()))

    def _cpu_online(self, path: Path) -> bool:
        online = path / "online"
        return not online.exists() or online.read_text().strip() == "1"

    def _memory_blocks(self) -> list[Path]:
        return sorted((e for e in self.memory_root.iterdir() if MEMORY_DIR.fullmatch(e.name)),
                      key=lambda p: int(p.name[len("memory"):]))

    def _block_bytes(self) -> int:
        return int((self.memory_root / "block_size_bytes").read_text().strip(), 16)

    def resources(self) -> GuestResources:
        cpus = sum(1 for path in self._cpus().values() if self._cpu_online(path))
        online = sum(1 for block in self._memory_blocks()
                     if (block / "state").read_text().strip().startswith("online"))
        return GuestResources(cpus, online * self._block_bytes())

    def set_cpus(self, wanted: int) -> None:
        """CPUs 0..wanted-1 online, the others offline (highest first)."""
        cpus = self._cpus()
        for number, path in cpus.items():
            online = path / "online"
            if not online.exists():
                continue
            want = number < wanted
            if self._cpu_online(path) != want:
                try:
                    online.write_text("1" if want else "0")
                except OSError as exc:
                    raise GuestError(f"cannot set cpu{number} {'on' if want else 'off'}line: "
                                     f"{exc.strerror}") from exc
                log.info("cpu%d %s", number, "online" if want else "offline")

    def online_memory(self) -> int:
        """Online every offline memory block (movable); the number onlined."""
        count = 0
        for block in self._memory_blocks():
            state = block / "state"
            if state.read_text().strip() != "offline":
                continue
            try:
                state.write_text("online_movable")
            except OSError as exc:
                raise GuestError(f"cannot online {block.name}: {exc.strerror}") from exc
            count += 1
        if count:
            log.info("onlined %d memory blocks", count)
        return count

    async def settle(self, vcpus: int, min_memory_bytes: int,
                     timeout_s: float = SETTLE_TIMEOUT_S) -> GuestResources:
        """Wait until ``vcpus`` CPUs are present and set exactly they online, and online
        memory reaches ``min_memory_bytes``, onlining what the kernel added meanwhile.

        :raise InvalidArgumentError: an impossible request.
        :raise GuestError: a CPU or memory block refused to change state.
        :raise DeadlineError: the hot-plugged CPUs or memory never showed up.
        """
        if not 0 < vcpus <= MAX_VCPUS:
            raise InvalidArgumentError(f"vcpus must be within 1..{MAX_VCPUS}, not {vcpus}")
        deadline = time.monotonic() + timeout_s
        while True:
            present = len(self._cpus())
            if present >= vcpus:
                self.set_cpus(vcpus)
            self.online_memory()
            now = self.resources()
            if present >= vcpus and now.online_vcpus == vcpus and \
                    now.memory_bytes >= min_memory_bytes:
                return now
            if time.monotonic() > deadline:
                raise DeadlineError(
                    f"after {timeout_s:.0f} s the guest has {present} CPUs present "
                    f"({now.online_vcpus} online, {vcpus} wanted) and "
                    f"{now.memory_bytes >> 20} MiB online ({min_memory_bytes >> 20} MiB wanted)")
            await asyncio.sleep(POLL_S)
