"""make bench-boot: how long a VM takes to run a container, and what it costs in memory.

Five cold boots (medians printed as JSON): QEMU spawn → QMP ready → agent ready →
container started → first output byte; RSS of QEMU, virtiofsd and this
process (the shim side) while the container runs; the accelerator used.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from shim import oci
from shim.config import load_config
from shim.sandbox.description import PodDescription
from shim.sandbox.sandbox import Sandbox
from tests.bench import emit, machine, medians
from tests.cri.harness import scratch_dirs
from tests.conftest import GUEST_DIR, write_test_config
from tests.rootfs import make_busybox_rootfs

RUNS = 5


def _rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / (1 << 20)
    except psutil.Error:
        return 0.0


async def one_boot(config_path: Path, rootfs: Path) -> dict[str, Any]:
    box = Sandbox(PodDescription(f"bench-{secrets.token_hex(4)}", hostname="bench"),
                  load_config(str(config_path)))
    try:
        await box.start()
        assert box.agent is not None and box.vm is not None
        spawned = box.vm.times.spawned_at
        root = box.shared.bind_rootfs("bench", rootfs)
        await box.agent.create_container("bench", oci.default_spec(
            ["sh", "-c", "echo first; sleep 1"], root, "bench"))
        output = box.agent.read_output("bench", "")
        await box.agent.start_container("bench")
        started = time.monotonic() - spawned
        await output.__anext__()
        first_byte = time.monotonic() - spawned
        rss = {"qemu_rss_mib": _rss_mib(box.vm.pid),
               "virtiofsd_rss_mib": _rss_mib(box.vm.virtiofsd_pid),
               "shim_side_rss_mib": _rss_mib(os.getpid())}
        await output.aclose()
        await box.agent.wait_process("bench", "")
        await box.agent.remove_container("bench")
        return {"qmp_ready_s": box.times.qmp_ready_s, "agent_ready_s": box.times.agent_ready_s,
                "container_started_s": started, "first_output_byte_s": first_byte, **rss,
                "accel": box.accel.accel.value if box.accel else ""}
    finally:
        await box.stop()


async def main() -> int:
    with scratch_dirs("bboot") as (work, state):
        config = write_test_config(work / "husk.toml", state)
        rootfs = make_busybox_rootfs(work / "rootfs")
        runs = []
        for i in range(RUNS):
            runs.append(await one_boot(config, rootfs))
            print(f"run {i + 1}/{RUNS}: {json.dumps(runs[-1])}", file=sys.stderr)
        result = {"benchmark": "boot", "runs": RUNS, "accel": runs[0]["accel"],
                  "median": medians(runs), "guest_image": str(GUEST_DIR), "machine": machine()}
        emit(result)
        return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
