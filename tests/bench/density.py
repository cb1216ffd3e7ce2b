"""make bench-density: the memory of N idle pods, husk against runc on one containerd.

Each round starts N pods at once (BENCH_PODS, default 10), each with one idle
busybox container, waits SETTLE_S (the guests' free page reporting hands back
what booting or restoring touched), then reads every process's PSS from
/proc/<pid>/smaps, so memory shared between pods (QEMU's and Python's code,
a template's page cache) counts once across them:

- husk: the shim daemon, and its share of the node's shim zygote (which forked
  it; its PSS divided by the pods); QEMU split into guest RAM, TCG's translation
  buffer (its executable anonymous mappings, one region per vCPU thread; KVM has
  none) and the rest; virtiofsd (both of its processes).

Guest RAM is the PSS of QEMU's private RAM (its anonymous mappings that KSM may
merge, VmFlags "mg"), plus what the shared node's memfd holds (its allocated
blocks, not its PSS: a pod restored from a template gets that RAM written into
the memfd by the shim, and a page the guest has not touched since is in no
process's page tables, yet it is memory the pod holds; the memfd is the pod's
alone, so it counts in full, once).
- runc: the runc shim and every process below it (pause and the container).

KSM: the husk pods are measured twice, once settled with KSM off ("husk_unmerged")
and once KSM has merged what it finds ("husk": two full scans that add under 1 %),
when the kernel has it; the node's KSM settings are put back afterwards.

Medians over the pods of BENCH_RUNS rounds (default 3), per pod, as JSON. Guest RAM
is split into NUMA nodes (BENCH_GUEST_RAM=shared measures the default instead).
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from shim.util.procstats import memfd_bytes
from shim.zygote import PROGRAM_TITLE
from tests.bench import emit, machine, medians
from tests.conftest import write_test_config
from tests.cri.cri import CriClient
from tests.cri.harness import Containerd, ContainerdOptions, scratch_dirs
from tests.cri.images import BUSYBOX_REF, build_images

PODS = int(os.environ.get("BENCH_PODS", "10"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SETTLE_S = 20.0
MIB = 1 << 20


def smaps_pss(pid: int) -> dict[str, int]:
    """PSS bytes of one process: its memfd mappings (shared guest RAM), its mergeable
    anonymous mappings (private guest RAM), the TCG buffer and the rest."""
    parts = {"memfd": 0, "private_ram": 0, "tcg_buffer": 0, "other": 0}
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return parts
    name, pss = "", 0
    for line in text.splitlines():
        first = line.split(None, 1)[0] if line.strip() else ""
        if first.endswith(":"):  # a field of the current mapping; VmFlags comes last
            if first == "Pss:":
                pss = int(line.split()[1]) * 1024
            elif first == "VmFlags:":
                flags = line.split()[1:]
                if "memfd:" in name:  # the shared node of guest RAM
                    parts["memfd"] += pss
                elif not name and "mg" in flags:  # private guest RAM (QEMU madvises it)
                    parts["private_ram"] += pss
                elif not name and "ex" in flags:  # TCG's code regions (rwx, anonymous)
                    parts["tcg_buffer"] += pss
                else:
                    parts["other"] += pss
        elif first:  # "start-end perms offset dev inode [name]": a new mapping
            fields = line.split(None, 5)
            name, pss = (fields[5] if len(fields) == 6 else ""), 0
    return parts


def _total(pid: int) -> int:
    return sum(smaps_pss(pid).values())


def _shim(pod_id: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "-id" in cmd and pod_id in cmd and "containerd-shim" in " ".join(cmd[:1]):
            return proc
    return None


def zygote_pss() -> int:
    """PSS bytes of the shim zygotes (one per husk version; normally one)."""
    return sum(_total(proc.pid) for proc in psutil.process_iter(["cmdline"])
               if (proc.info["cmdline"] or [""])[0] == PROGRAM_TITLE)


def husk_pod(pod_id: str, state: Path, zygote_share: int = 0) -> dict[str, float]:
    marker = str(state / "sb" / pod_id)
    sample = {"shim": 0, "shim_zygote_share": zygote_share, "qemu_guest_ram": 0, "qemu_tcg_buffer": 0, "qemu_other": 0,
              "virtiofsd": 0}
    shim = _shim(pod_id)
    if shim is not None:
        sample["shim"] = _total(shim.pid)
    memfds: set[int] = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if marker not in cmd:
            continue
        if "qemu-system" in cmd:
            parts = smaps_pss(proc.pid)
            sample["qemu_guest_ram"] += memfd_bytes(proc.pid, memfds) + parts["private_ram"]
            sample["qemu_tcg_buffer"] += parts["tcg_buffer"]
            sample["qemu_other"] += parts["other"]
        elif "virtiofsd" in cmd:  # its mappings of guest RAM are in qemu_guest_ram
            for pid in [proc.pid, *(c.pid for c in proc.children(recursive=True))]:
                parts = smaps_pss(pid)
                sample["virtiofsd"] += parts["tcg_buffer"] + parts["other"]
    out = {f"{k}_mib": round(v / MIB, 1) for k, v in sample.items()}
    out["total_mib"] = round(sum(sample.values()) / MIB, 1)
    out["total_without_tcg_buffer_mib"] = round(
        (sum(sample.values()) - sample["qemu_tcg_buffer"]) / MIB, 1)
    return out


def runc_pod(pod_id: str) -> dict[str, float]:
    shim = _shim(pod_id)
    if shim is None:
        return {"total_mib": 0.0}
    total = _total(shim.pid) + sum(_total(c.pid) for c in shim.children(recursive=True))
    return {"total_mib": round(total / MIB, 1)}


class Ksm:
    """The node's KSM switches (/sys/kernel/mm/ksm), put back as found."""

    DIR = Path("/sys/kernel/mm/ksm")
    SCAN_PAGES = 1000  # per 20 ms wake-up: a few seconds per full scan of ten pods
    MERGE_TIMEOUT_S = 300.0
    SETTLED_PAGES = 256  # merged in one round of two scans: KSM has found what it will

    def __init__(self) -> None:
        self.saved = {name: self._read(name) for name in ("run", "pages_to_scan")} \
            if self.available() else {}

    @classmethod
    def available(cls) -> bool:
        return (cls.DIR / "run").exists()

    def _read(self, name: str) -> str:
        return (self.DIR / name).read_text().strip()

    def _write(self, name: str, value: object) -> None:
        (self.DIR / name).write_text(f"{value}\n")

    def stop(self) -> None:
        if self.saved:
            self._write("run", 0)

    def merge(self) -> float:
        """Run KSM until a full scan merges (almost) nothing more; the seconds it took.
        A page merges only once its content held still between two scans, so the
        first scans leave much of what is the same unmerged."""
        began = time.monotonic()
        self._write("pages_to_scan", self.SCAN_PAGES)
        self._write("run", 1)
        scans, sharing = int(self._read("full_scans")), -1
        while True:
            if time.monotonic() - began > self.MERGE_TIMEOUT_S:
                raise TimeoutError(f"KSM still merging after {self.MERGE_TIMEOUT_S}s")
            time.sleep(1)
            if int(self._read("full_scans")) < scans + 2:
                continue
            scans, before, sharing = int(self._read("full_scans")), sharing, \
                int(self._read("pages_sharing"))
            if before >= 0 and sharing - before <= max(before // 100, self.SETTLED_PAGES):
                return time.monotonic() - began

    def restore(self) -> None:
        for name, value in self.saved.items():
            self._write(name, value)


def one_round(cri: CriClient, handler: str, state: Path, index: int,
              ksm: Ksm | None = None) -> dict[str, list[dict[str, float]]]:
    """PSS samples of one round's pods: {"runc": ...} or {"husk_unmerged": ..., "husk": ...}."""
    def bring_up(i: int) -> str:
        pod = cri.run_pod(f"dense-{handler}-{index}-{i}", handler=handler, timeout=600)
        cri.run_container(pod, BUSYBOX_REF, ["sleep", "3600"], timeout=600)
        return pod.id

    with ThreadPoolExecutor(PODS) as pool:
        pods = list(pool.map(bring_up, range(PODS)))
    try:
        time.sleep(SETTLE_S)
        if handler != "husk":
            return {"runc": [runc_pod(p) for p in pods]}
        share = zygote_pss() // len(pods)
        samples = {"husk_unmerged": [husk_pod(p, state, share) for p in pods]}
        if ksm is not None:
            merge_s = ksm.merge()
            share = zygote_pss() // len(pods)
            samples["husk"] = [dict(husk_pod(p, state, share), ksm_merge_s=round(merge_s, 1))
                               for p in pods]
            ksm.stop()
        return samples
    finally:
        with ThreadPoolExecutor(PODS) as pool:
            list(pool.map(cri.stop_and_remove_pod, pods))


def main() -> int:
    with scratch_dirs("bdense") as (work, state):
        config = write_test_config(work / "husk.toml", state, templates=True,
                                   guest_ram=os.environ.get("BENCH_GUEST_RAM", "split"))
        options = ContainerdOptions(images=build_images(), husk_config=config, log_level="info")
        samples: dict[str, list[dict[str, float]]] = {}
        ksm = Ksm() if Ksm.available() else None
        try:
            if ksm is not None:
                ksm.stop()  # the unmerged figures first
            with Containerd.started(options) as cd:
                for handler in ("runc", "husk"):
                    for i in range(RUNS):
                        for kind, found in one_round(cd.cri, handler, state, i, ksm).items():
                            samples.setdefault(kind, []).extend(found)
                            print(f"{kind} round {i + 1}/{RUNS}: {json.dumps(found)}",
                                  file=sys.stderr)
        finally:
            if ksm is not None:
                ksm.restore()
        results = {kind: medians(found) for kind, found in samples.items()}
        results.setdefault("husk", results["husk_unmerged"])
        emit({"benchmark": "density", "pods": PODS, "runs": RUNS, "settle_s": SETTLE_S,
              "ksm": ksm is not None,
              "pss_per_pod_median": results,
              "husk_over_runc": round(results["husk"]["total_mib"]
                                      / max(results["runc"]["total_mib"], 0.1), 1),
              "machine": machine(state)},
             Path(__file__).resolve().parents[2] / "build" / "bench" / "density.json")
        return 0


if __name__ == "__main__":
    sys.exit(main())
