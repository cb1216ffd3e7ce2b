"""make bench-resize: in-place resize through the CRI, husk against runc on one containerd.

BENCH_RUNS rounds (default 5) per handler, each a new pod with a container
limited to 1 CPU and 256 MiB: UpdateContainerResources up to 3 CPUs and 1 GiB,
then back down. For husk, UpdateContainerResources returns once the guest has the new vCPUs
and memory online (the shim waits for the agent), so its time is the time until
the guest sees them; each round checks that with nproc and /proc/meminfo. runc
only rewrites the container's cgroup. Medians as JSON (build/bench/resize.json).
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

from cri_api.v1 import api_pb2 as api

from tests.bench import emit, machine, medians
from tests.conftest import write_test_config
from tests.cri.cri import CriClient
from tests.cri.harness import REPO_ROOT, Containerd, ContainerdOptions, scratch_dirs
from tests.cri.images import BUSYBOX_REF, build_images

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
OUTPUT = REPO_ROOT / "build" / "bench" / "resize.json"
HANDLERS = ("runc", "husk")
MIB = 1 << 20
SMALL = api.LinuxContainerResources(cpu_period=100_000, cpu_quota=100_000,
                                    memory_limit_in_bytes=256 * MIB)
BIG = api.LinuxContainerResources(cpu_period=100_000, cpu_quota=300_000,
                                  memory_limit_in_bytes=1024 * MIB)
UPDATE_TIMEOUT_S = 120.0


def _seen(cri: CriClient, cid: str) -> tuple[int, int]:
    """(online CPUs, MemTotal MiB) inside the container."""
    out = cri.exec_sync(cid, ["sh", "-c", "nproc; grep MemTotal /proc/meminfo"]).out
    cpus, meminfo = out.splitlines()[:2]
    match = re.search(r"(\d+) kB", meminfo)
    assert match, meminfo
    return int(cpus), int(match.group(1)) // 1024


def _timed_update(cri: CriClient, cid: str, resources: api.LinuxContainerResources) -> float:
    began = time.monotonic()
    cri.update_container_resources(cid, resources, timeout=UPDATE_TIMEOUT_S)
    return time.monotonic() - began


def one_round(cri: CriClient, handler: str, index: int) -> dict[str, Any]:
    """A fresh pod each round, so every grow hot-plugs (a VM keeps memory it was given)."""
    pod = cri.run_pod(f"bench-resize-{handler}-{index}", handler=handler, resources=SMALL)
    try:
        cid = cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"], resources=SMALL)
        boot = _seen(cri, cid)
        grow_s = _timed_update(cri, cid, BIG)
        grown = _seen(cri, cid)
        shrink_s = _timed_update(cri, cid, SMALL)
        shrunk = _seen(cri, cid)
    finally:
        cri.stop_pod(pod.id)
        cri.remove_pod(pod.id)
    if handler == "husk" and grown[0] != 3:
        raise RuntimeError(f"the guest shows {grown[0]} CPUs after the update, not 3")
    return {"grow_s": round(grow_s, 3), "shrink_s": round(shrink_s, 3),
            "vcpus_boot": boot[0], "memory_mib_boot": boot[1],
            "vcpus_grown": grown[0], "memory_mib_grown": grown[1],
            "vcpus_shrunk": shrunk[0], "memory_mib_shrunk": shrunk[1]}


def measure(cri: CriClient, handler: str) -> dict[str, Any]:
    rounds = []
    for i in range(RUNS):
        rounds.append(one_round(cri, handler, i))
        print(f"{handler} {i + 1}/{RUNS}: {rounds[-1]}", file=sys.stderr)
    return {"median": medians(rounds), "runs": rounds}


def main() -> int:
    if RUNS < 1:
        raise SystemExit("BENCH_RUNS must be at least 1")
    started = time.monotonic()
    with scratch_dirs("bresize") as (work, state):
        # Room for 3 vCPUs on any host (max_vcpus = 0 would cap at the host's CPUs).
        config = write_test_config(work / "husk.toml", state, max_vcpus=4)
        options = ContainerdOptions(images=build_images(), husk_config=config, log_level="info")
        with Containerd.started(options) as cd:
            results = {handler: measure(cd.cri, handler) for handler in HANDLERS}
        emit({"benchmark": "resize", "machine": machine(state), "runs": RUNS,
              **results,
              "method": {"pod_and_container_limits": "1 CPU, 256 MiB",
                         "grow_to": "3 CPUs, 1 GiB", "shrink_to": "1 CPU, 256 MiB",
                         "grow_s": ("UpdateContainerResources until it returned; for husk "
                                    "the guest has the vCPUs and memory online by then"),
                         "seen": "nproc and MemTotal in the container after each update"},
              "seconds": round(time.monotonic() - started, 1)}, OUTPUT)
        return 0


if __name__ == "__main__":
    sys.exit(main())
